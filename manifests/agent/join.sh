#!/bin/sh
# The agent pod's "join" init container: the first time a pod starts on a node, trade the node's
# single-use join token for the agent's identity (`edgefed edge join`, which writes agent.json
# into the node's state directory); on every later start the existing agent.json is kept, so
# the agent keeps its id and its installed models across pod restarts and upgrades.
set -eu
state_dir="${EDGEFED_STATE_DIR:?EDGEFED_STATE_DIR is not set}"
node="${NODE_NAME:?NODE_NAME is not set}"
if [ -f "$state_dir/agent.json" ]; then
    echo "agent already joined ($state_dir/agent.json); keeping its identity"
    exit 0
fi
if [ ! -w "$state_dir" ]; then
    echo "cannot write the state directory $state_dir: on node $node run" \
        "'install -d -m 0700 -o 10001 -g 10001 $state_dir' (README, Kubernetes and k3s)" >&2
    exit 1
fi
token_file="${EDGEFED_JOIN_TOKENS_DIR:-/etc/edgefed/join-tokens}/$node"
if [ ! -s "$token_file" ]; then
    echo "no join token for node $node: add one to the edgefed-join-tokens Secret under the" \
        "key $node (edgefed cloud join-token --label node=$node)" >&2
    exit 1
fi
set -- edge join --controller "${EDGEFED_JOIN_CONTROLLER_URL:?EDGEFED_JOIN_CONTROLLER_URL is not set}" \
    --token "$(cat "$token_file")" --state-dir "$state_dir" --label "node=$node"
if [ -n "${EDGEFED_JOIN_DEVICE_PROFILE:-}" ]; then
    set -- "$@" --device-profile "$EDGEFED_JOIN_DEVICE_PROFILE"
fi
exec edgefed "$@"
