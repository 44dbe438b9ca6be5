"""Secret files handed over by systemd: the ``credential:NAME`` form of a secret-file key.

Under the packaged unit (deploy/systemd/iortd.service) the signing key stays in
``/etc/iortd/signing.key``, mode 0600 and owned by root, where the service user cannot read
it. The unit's ``LoadCredential=signing-key:/etc/iortd/signing.key`` makes systemd read it as
root and give the service a private, read-only copy at ``$CREDENTIALS_DIRECTORY/signing-key``,
visible to that service only (systemd.exec(5), "Credentials"). The config names it by the
credential's name, not by where systemd puts it::

    [log]
    signing_key_file = "credential:signing-key"

The keys that hold secrets accept this form: ``log.signing_key_file``, ``mqtt.password_file``
``mqtt.key_file`` and
``commands.keyring``. It resolves on load against the environment of the process, so
``iortd check-config`` checks exactly the file ``iortd run`` will open, and nothing is
guessed: without ``$CREDENTIALS_DIRECTORY`` (not started by systemd with a credential) the
key is a configuration error that says how to give it. Only the name reaches the audit log
(the config is recorded there), never the secret.

The form is checked by the models (:mod:`~iortd.daemon.config.model`), resolved by
:func:`~iortd.daemon.config.checks._resolve_credentials` before relative paths are resolved.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CREDENTIAL_PREFIX", "NAME_MEANING", "SECRET_FILE_KEYS", "credential_name"]

CREDENTIAL_PREFIX = "credential:"
# A credential name is a file name in $CREDENTIALS_DIRECTORY (systemd.exec(5)): no '/', and
# kept to the characters a unit file can carry without quoting.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_MEANING = "a systemd credential name (letters, digits, '.', '_', '-'; at most 64)"
# The keys whose value is a secret file, and so may come from a credential.
SECRET_FILE_KEYS = (
    ("log", "signing_key_file"),
    ("mqtt", "password_file"),
    ("mqtt", "key_file"),
    ("commands", "keyring"),
)


def credential_name(value: Path | str) -> str | None:
    """The credential's name if ``value`` is ``credential:NAME``, else None.

    Raises ValueError for the form with a name that cannot be a credential's."""
    text = str(value)
    if not text.startswith(CREDENTIAL_PREFIX):
        return None
    name = text.removeprefix(CREDENTIAL_PREFIX)
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{CREDENTIAL_PREFIX}NAME needs {NAME_MEANING}; got {text!r}")
    return name
