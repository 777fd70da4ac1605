"""The broker's password and ACL files as the controller renders them, read by a real
mosquitto 2.0: our PBKDF2-SHA512 ``$7$`` hashes are accepted, agents stay in their lane, a
SIGHUP lets a newly rendered agent in, and malformed input is refused with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from edgefed.cloud.brokerauth.acl import agent_rules, render_acl, render_passwords
from edgefed.cloud.brokerauth.files import BrokerAuth
from edgefed.cloud.brokerauth.passwords import hash_password, new_password, verify_password
from edgefed.cloud.brokerauth.settings import MqttAuthSettings
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import BrokerAuthError, ConfigError
from edgefed.common.mqtt import Message
from edgefed.common.topics import Topics
from tests.faults.drills.secured_fleet import mqtt_client

pytestmark = pytest.mark.integration


def auth_in(folder: Path) -> BrokerAuth:
    return BrokerAuth(MqttAuthSettings(enabled=True), "f1", folder)


def test_hashes_match_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd ships with mosquitto, which the suite needs"
    passwd = tmp_path / "passwd"
    passwd.write_text("u:s3cret\n")
    subprocess.run([tool, "-U", str(passwd)], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$101$")
    assert verify_password("s3cret", theirs)
    assert not verify_password("s3cret!", theirs)
    ours = hash_password("s3cret")
    assert ours.startswith("$7$101$")
    assert ours != hash_password("s3cret")  # salted
    assert verify_password("s3cret", ours)


def test_mosquitto_lets_in_only_rendered_users_and_rereads_the_files_on_sighup(
    tmp_path: Path,
) -> None:
    auth = auth_in(tmp_path / "files")
    a_pw, b_pw = new_password(), new_password()
    auth.write([("a1", hash_password(a_pw))])

    async def connects(url: str, user: str, password: str) -> bool:
        try:
            async with mqtt_client(url, f"c-{user}", user, password):
                return True
        except BrokerAuthError:
            return False

    with PrivateBroker(
        data_dir=tmp_path / "broker", password_file=auth.password_file, acl_file=auth.acl_file
    ) as broker:
        assert asyncio.run(connects(broker.url, "a1", a_pw))
        assert not asyncio.run(connects(broker.url, "a1", b_pw))
        assert not asyncio.run(connects(broker.url, "b1", b_pw))
        user, secret = auth.worker_credentials()
        assert asyncio.run(connects(broker.url, user, secret.get_secret_value()))

        auth.write([("a1", hash_password(a_pw)), ("b1", hash_password(b_pw))])
        broker.reload()
        deadline = 50
        while not asyncio.run(connects(broker.url, "b1", b_pw)):  # SIGHUP is handled async
            deadline -= 1
            assert deadline, "mosquitto did not re-read its password file after SIGHUP"


def test_agents_acl_names_only_their_own_topics(tmp_path: Path) -> None:
    topics = Topics("f1")
    rules = agent_rules(topics, "a1")
    assert all("/agents/a1/" in r or "/+/" in r or "/clients/a1/" in r for r in rules)
    assert "topic read edgefed/v1/f1/agents/a1/desired" in rules
    assert not any(r.startswith("topic write") and r.endswith("/desired") for r in rules)
    acl = render_acl(topics, ["b2", "a1"], controller_user="ctl", worker_user="wrk")
    assert acl.index("user a1\n") < acl.index("user b2\n")
    assert "user ctl\ntopic readwrite edgefed/v1/f1/#\n" in acl


def test_bad_input_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    auth = auth_in(tmp_path)
    with pytest.raises(ConfigError, match="clash with the broker's service users"):
        auth.write([("edgefed-controller", hash_password("x"))])
    with pytest.raises(ConfigError, match="agent id"):
        agent_rules(Topics("f1"), "a/#")
    with pytest.raises(ConfigError, match="not a mosquitto"):
        render_passwords([("a1", "plaintext")])
    with pytest.raises(ConfigError, match="must not be empty"):
        hash_password("")
    with pytest.raises(ConfigError, match="not a mosquitto"):
        verify_password("x", "$6$abc")
    with pytest.raises(ConfigError, match="not both"):
        PrivateBroker(users={"u": "p"}, password_file=tmp_path / "passwd")


def test_every_role_can_do_its_job_under_the_rendered_acl(tmp_path: Path) -> None:
    """The ACL must not be too strict either: an agent's request reaches a pool's worker
    through the shared subscription and the reply comes back; the controller's desired state
    reaches the agent and the agent's heartbeat the controller; the worker reports its load."""
    auth = auth_in(tmp_path / "files")
    topics = Topics("f1")
    a_pw = new_password()
    auth.write([("a1", hash_password(a_pw))])
    ctl_user, ctl_pw = auth.controller_credentials()
    wrk_user, wrk_pw = auth.worker_credentials()

    async def scenario(url: str) -> set[str]:
        got: set[str] = set()
        done = asyncio.Event()
        want = {"worker<-request", "agent<-reply", "agent<-desired", "controller<-heartbeat"}
        want.add("controller<-load")

        def note(what: str) -> None:
            got.add(what)
            if got >= want:
                done.set()

        async with (
            mqtt_client(url, "a1", "a1", a_pw) as agent,
            mqtt_client(url, "w1", wrk_user, wrk_pw.get_secret_value()) as worker,
            mqtt_client(url, "ctl", ctl_user, ctl_pw.get_secret_value()) as controller,
        ):

            async def on_request(message: Message) -> None:
                note("worker<-request")
                await worker.publish(topics.replies("a1"), b"answer", qos=1)

            async def on_reply(message: Message) -> None:
                note("agent<-reply")

            async def on_desired(message: Message) -> None:
                note("agent<-desired")

            async def on_heartbeat(message: Message) -> None:
                note("controller<-heartbeat")

            async def on_load(message: Message) -> None:
                note("controller<-load")

            await worker.subscribe(topics.worker_infer_shared("p"), on_request)
            await agent.subscribe(topics.replies("a1"), on_reply)
            await agent.subscribe(topics.desired("a1"), on_desired)
            await controller.subscribe(topics.all_heartbeats(), on_heartbeat)
            await controller.subscribe(topics.all_worker_load(), on_load)
            await agent.publish(topics.worker_infer("p"), b"request", qos=1)
            await agent.publish(topics.heartbeat("a1"), b"beat", qos=1)
            await controller.publish(topics.desired("a1"), b"desired", qos=1)
            await worker.publish(topics.worker_load("p", "w1"), b"load", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await done.wait()
        return want - got

    with PrivateBroker(
        data_dir=tmp_path / "broker", password_file=auth.password_file, acl_file=auth.acl_file
    ) as broker:
        assert asyncio.run(scenario(broker.url)) == set()
