"""qemu-img's `--object OBJECTDEF`: QOM objects defined on the command line, checked as QEMU 7.2 does.

qemu-img uses them for secrets (`secret,id=sec0,data=...` or `file=...`, optionally
`format=base64`, or encrypted with `keyid=`/`iv=`), which unlock encrypted images. qcowdisk
opens no encrypted image (it refuses them), so a secret is used for nothing: it is parsed and
checked with QEMU's messages and exit status 1 (keyval syntax, the `qom-type` and `id`
parameters, the secret's members, its file, its base64, the key and IV of an encrypted one;
the ciphertext itself is not decrypted, as that needs AES, so a wrong key is not detected).
`help` lists the object types, `secret,help` a secret's properties, as qemu-img prints them.

"""

from __future__ import annotations

import os
import re
import sys

from ..ops.imageopts import qdict_order
from . import objtypes
from .common import UsageError

# QEMU 7.2's ObjectType enum (qapi/qom.json): another name "does not accept value"
OBJECT_TYPES = frozenset((
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan", "colo-compare",
    "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer",
    "filter-dump", "filter-mirror", "filter-redirector", "filter-replay", "filter-rewriter", "input-barrier",
    "input-linux", "iothread", "main-loop", "memory-backend-epc", "memory-backend-file", "memory-backend-memfd",
    "memory-backend-ram", "pef-guest", "pr-manager-helper", "qtest", "rng-builtin", "rng-egd", "rng-random",
    "secret", "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest", "throttle-group",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object",
    "x-vfio-user-server"))
# the types built into qemu-img (`qemu-img info --object help`)
QEMU_IMG_TYPES = ("authz-list", "authz-list-file", "authz-simple", "main-loop", "pr-manager-helper", "secret",
                  "secret_keyring", "thread-context", "throttle-group", "tls-cipher-suites", "tls-creds-anon",
                  "tls-creds-psk", "tls-creds-x509")
_SECRET_MEMBERS = ("data", "file", "format", "iv", "keyid", "loaded")
_SECRET_HELP = ("secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n"
                "  iv=<string>\n  keyid=<string>\n")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
_ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


class ObjectHelp(Exception):
    """`--object help` (or `TYPE,help`) was printed: qemu-img exits with status 0."""


def _refuse(message: str) -> UsageError:
    return UsageError(message)


def keyval(text: str, flat: dict[str, str] | None = None) -> tuple[dict[str, str], set[str], bool]:
    """QEMU's keyval_parse with the implied key `qom-type`: ({key: last value}, the prefixes of
    dotted keys, whether `help` was asked for). `flat`, if given, gets every key (dotted ones
    whole) with its last value, in first-insertion order."""
    values: dict[str, str] = {}
    dotted: set[str] = set()
    wants_help = False
    pos, first = 0, True
    while pos < len(text):
        length = len(re.match(r"[^=,]*", text[pos:]).group(0))  # type: ignore[union-attr]
        bare = text[pos + length:pos + length + 1] != "="
        if bare and text[pos:pos + length] in ("help", "?"):
            wants_help = True
            pos += length + 1
            first = False
            continue
        if first and length and bare:
            key = "qom-type"
        else:
            key = text[pos:pos + length]
            pos += length
            parts = key.split(".")
            if not all(_KEY.match(p) or (i and p.isdigit() and p.isascii()) for i, p in enumerate(parts)):
                raise _refuse(f"Invalid parameter '{key}'")
            if text[pos:pos + 1] != "=":
                raise _refuse(f"Expected '=' after parameter '{key}'")
            pos += 1
        out: list[str] = []
        while pos < len(text):
            if text[pos] == ",":
                if text[pos + 1:pos + 2] != ",":
                    break
                pos += 1
            out.append(text[pos])
            pos += 1
        pos += 1  # the comma
        first = False
        top = key.split(".")[0]
        if ("." in key and top in values) or ("." not in key and top in dotted):
            raise _refuse(f"Parameters '{top}.*' used inconsistently")
        if "." in key:
            dotted.add(top)
        else:
            values[key] = "".join(out)
        if flat is not None:
            flat[key] = "".join(out)
    return values, dotted, wants_help


def _b64decode(text: str) -> bytes:
    """qbase64_decode: refuse characters outside base64, then GLib's lenient decoding (whole
    groups of four characters only)."""
    if "\0" in text:
        raise _refuse("Base64 data contains embedded NUL characters")
    if not set(text) <= _BASE64_CHARS:
        raise _refuse("Base64 data contains invalid characters")
    chars = text.replace("\n", "")
    chars = chars[:len(chars) // 4 * 4]
    import base64  # (here: every command line loads this module, few carry secrets)
    import binascii
    try:
        return base64.b64decode(chars) if chars else b""
    except (binascii.Error, ValueError):
        raise _refuse("Base64 data contains invalid characters") from None


def _secret_value(props: dict[str, str], secrets: dict[str, bytes]) -> bytes:
    """qcrypto_secret_common_complete: the secret's bytes (ciphertext kept as it is)."""
    if "file" in props:
        if "data" in props:
            raise _refuse("'file' and 'data' are mutually exclusive")
        path = props["file"]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except IsADirectoryError as e:
            raise _refuse(f"Unable to read {path}: Error reading file \u201c{path}\u201d: {e.strerror}") from None
        except OSError as e:
            raise _refuse(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                          f"{e.strerror or os.strerror(e.errno or 0)}") from None
    elif "data" in props:
        raw = props["data"].encode()
    else:
        raise _refuse("Either 'file' or 'data' must be provided")
    base64_format = props.get("format") == "base64"
    if "keyid" not in props:
        return _b64decode(raw.decode("latin-1")) if base64_format else raw
    keyid = props["keyid"]
    if keyid not in secrets:
        raise _refuse(f"No secret with id '{keyid}'")
    if len(secrets[keyid]) != 32:
        raise _refuse("Key should be 32 bytes in length")
    if "iv" not in props:
        raise _refuse("IV is required to decrypt secret")
    iv = _b64decode(props["iv"])
    if len(iv) != 16:
        raise _refuse(f"IV should be {16} bytes in length not {len(iv)}")
    ciphertext = _b64decode(raw.decode("latin-1")) if base64_format else raw
    if len(ciphertext) % 16:
        raise _refuse(f"Length {len(ciphertext)} must be a multiple of block size 16")
    return ciphertext  # (AES-256-CBC decryption is QEMU's; qcowdisk never uses the value)


def process_objects(definitions: list[str]) -> dict[str, bytes]:
    """Check every --object as qemu-img creates them, in order: {secret id: value}.
    Raises UsageError with QEMU's message, or ObjectHelp after printing help."""
    secrets: dict[str, bytes] = {}
    ids: set[str] = set()
    objtypes.reset()
    for text in definitions:
        flat: dict[str, str] = {}
        props, dotted, wants_help = keyval(text, flat)
        tree = objtypes.nest(flat)
        qom_type = props.pop("qom-type", None)
        if wants_help:  # a type qemu-img lacks (or none) gets the list of those it has
            if qom_type == "secret":
                sys.stdout.write(_SECRET_HELP)
            elif qom_type in objtypes.HELP:
                sys.stdout.write(objtypes.help_text(qom_type))
            else:
                sys.stdout.write("List of user creatable objects:\n" + "".join(f"  {t}\n" for t in QEMU_IMG_TYPES))
            raise ObjectHelp()
        if qom_type is None:
            raise _refuse("Parameter 'qom-type' is missing")
        if qom_type not in OBJECT_TYPES:
            raise _refuse(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if qom_type != "secret" and qom_type not in objtypes.SCHEMAS:
            raise _refuse(f"qcowdisk does not support objects of type '{qom_type}'")
        if "id" not in props:
            raise _refuse("Parameters 'id.*' are unexpected" if "id" in dotted else "Parameter 'id' is missing")
        if qom_type != "secret":
            _create(qom_type, tree, ids)
            continue
        if props.get("format", "raw") not in ("raw", "base64"):
            raise _refuse(f"Parameter 'format' does not accept value '{props['format']}'")
        for key in qdict_order([*props, *dotted]):
            if key in dotted and key in _SECRET_MEMBERS:
                raise _refuse(f"Parameters '{key}.*' are unexpected")
            if key != "id" and key not in _SECRET_MEMBERS:
                raise _refuse(f"Parameter '{key}' is unexpected")
        sid = props.pop("id")
        _check_id(sid)
        if "loaded" in props:
            raise _refuse("Property 'secret.loaded' is not writable")
        _register(sid, ids)
        secrets[sid] = _secret_value(props, secrets)
    return secrets


def _check_id(oid: str) -> None:
    if not _ID.match(oid):
        raise _refuse(f"Parameter 'id' expects an identifier\n{_ID_HINT}")


def _register(oid: str, ids: set[str]) -> None:
    """Add the object under /objects: each id once, whatever the types."""
    if oid in ids:
        raise _refuse(f"attempt to add duplicate property '{oid}' to object (type 'container')")
    ids.add(oid)


def _create(qom_type: str, tree: dict[str, object], ids: set[str]) -> None:
    """An object of another type qemu-img creates: checked, then ignored."""
    oid = tree.pop("id")
    tree.pop("qom-type", None)
    assert isinstance(oid, str)  # (a scalar: keyval refused 'id' used with dotted keys)
    objtypes.create(qom_type, tree, lambda: _check_id(oid), lambda: _register(oid, ids))


__all__ = ["process_objects", "ObjectHelp", "keyval", "OBJECT_TYPES", "QEMU_IMG_TYPES"]
