"""The model artifact format: a directory of model files, ``manifest.json`` listing each file's
size and SHA-256, and a detached Ed25519 signature ``manifest.sig`` over the manifest's bytes.

Build with :func:`write_artifact`, check with :func:`verify` before loading anything.
"""

from edgefed.common.artifact.build import sign_manifest, write_artifact
from edgefed.common.artifact.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    Quantization,
    SplitInfo,
    Task,
    TensorSpec,
    parse_manifest,
    unsafe_path_problem,
)
from edgefed.common.artifact.signing import (
    SignatureFile,
    SigningKey,
    VerifyKey,
    generate_signing_key,
    key_id,
    load_signing_key,
    load_verify_key,
    sign_bytes,
)
from edgefed.common.artifact.verify import verify, verify_manifest

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SIGNATURE_NAME",
    "FileEntry",
    "Manifest",
    "Quantization",
    "SignatureFile",
    "SigningKey",
    "SplitInfo",
    "Task",
    "TensorSpec",
    "VerifyKey",
    "generate_signing_key",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "parse_manifest",
    "sign_bytes",
    "sign_manifest",
    "unsafe_path_problem",
    "verify",
    "verify_manifest",
    "write_artifact",
]
