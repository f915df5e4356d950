"""The --object types other than `secret` that qemu-img 7.2 creates, checked as QEMU creates them.

None of them changes how an image is read or written (throttling, thread pools, CPU affinity,
authorization and TLS credentials serve a running QEMU, not qemu-img's image operations), so
qcowdisk checks each one with QEMU's messages and then ignores it. QEMU creates an object in
three steps, followed here: its QAPI members are checked in schema order (missing, wrongly typed
and, last, unexpected parameters); its properties are set in QDict order (setter checks); the
object is completed (the type's own checks). Where completing needs what qcowdisk cannot
reproduce (a kernel keyring, TLS credential files, a persistent-reservation helper), the
object is refused naming its type.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..ops.imageopts import qdict_order
from ..ops.qemuopts import OptionError, parse_bool, strtou64
from .common import UsageError

_INT, _INT32, _STR, _BOOL, _U16LIST = "int", "int32", "str", "bool", "u16list"
_ENDPOINT = ("client", "server")
_POLICY = ("deny", "allow")
_THROTTLE_NAMES = [f"{kind}-{op}{suffix}" for kind in ("iops", "bps") for op in ("total", "read", "write")
                   for suffix in ("", "-max", "-max-length")] + ["iops-size"]
_TLS = {"verify-peer": _BOOL, "dir": _STR, "endpoint": _ENDPOINT, "priority": _STR}
# QAPI members in schema order: kind, or a tuple of enum values; "limits"/"rules" are structured
SCHEMAS: dict[str, dict[str, object]] = {
    "throttle-group": {"limits": "limits", **{f"x-{n}": _INT for n in _THROTTLE_NAMES}},
    "main-loop": {"aio-max-batch": _INT, "thread-pool-min": _INT, "thread-pool-max": _INT},
    "thread-context": {"cpu-affinity": _U16LIST, "node-affinity": _U16LIST},
    "authz-simple": {"identity": _STR},
    "authz-list": {"policy": _POLICY, "rules": "rules"},
    "authz-listfile": {"filename": _STR, "refresh": _BOOL},
    "tls-creds-anon": {**_TLS, "loaded": _BOOL},
    "tls-creds-psk": {**_TLS, "loaded": _BOOL, "username": _STR},
    "tls-creds-x509": {**_TLS, "loaded": _BOOL, "sanity-check": _BOOL, "passwordid": _STR},
    "tls-cipher-suites": dict(_TLS),
    "secret_keyring": {"loaded": _BOOL, "format": ("raw", "base64"), "keyid": _STR, "iv": _STR, "serial": _INT32},
    "pr-manager-helper": {"path": _STR},
}
_REQUIRED = {"authz-simple": ("identity",), "authz-listfile": ("filename",), "secret_keyring": ("serial",),
             "pr-manager-helper": ("path",)}
_TLS_HELP = {"dir": "string", "endpoint": "QCryptoTLSCredsEndpoint", "priority": "string", "verify-peer": "bool"}
# `TYPE,help`: the QOM properties qemu-img lists (writable ones, with their QOM type names)
HELP: dict[str, dict[str, str]] = {
    "throttle-group": {"limits": "ThrottleLimits", **{f"x-{n}": "int" for n in _THROTTLE_NAMES}},
    "main-loop": {"aio-max-batch": "int", "thread-pool-max": "int", "thread-pool-min": "int"},
    "thread-context": {"cpu-affinity": "int", "node-affinity": "int"},
    "authz-simple": {"identity": "string"},
    "authz-list": {"policy": "QAuthZListPolicy", "rules": "QAuthZListRule"},
    "authz-list-file": {"filename": "string", "refresh": "bool"},
    "tls-creds-anon": _TLS_HELP, "tls-cipher-suites": _TLS_HELP,
    "tls-creds-psk": {**_TLS_HELP, "username": "string"},
    "tls-creds-x509": {**_TLS_HELP, "passwordid": "string", "sanity-check": "bool"},
    "secret_keyring": {"format": "QCryptoSecretFormat", "iv": "string", "keyid": "string", "serial": "int32_t"},
    "pr-manager-helper": {"path": "string"},
}
_UINT_MAX = 0xFFFFFFFF
_INT64_MAX = (1 << 63) - 1
_THROTTLE_VALUE_MAX = 1000000000000000
_SUN_PATH = 108  # sizeof(struct sockaddr_un.sun_path)
_RULE: dict[str, object] = {"match": _STR, "policy": _POLICY, "format": ("exact", "glob")}


def help_text(qom_type: str) -> str:
    """qemu-img's `TYPE,help`: the properties as `name=<type>` lines, sorted as printed."""
    lines = sorted(f"  {name}=<{kind}>\n" for name, kind in HELP[qom_type].items())
    return f"{qom_type} options:\n" + "".join(lines)


def strtoi64(name: str, text: str) -> int:
    """The keyval visitor's int64: qemu_strtoi64 in base 0, else `Parameter ... expects integer`."""
    body = text.lstrip(" \t\n\v\f\r")
    negative = body[:1] == "-"
    body = body[1:] if body[:1] in "+-" else body
    try:
        if body[:1] in ("+", "-"):
            raise ValueError(text)
        value = strtou64(body)
    except (ValueError, OverflowError):
        raise UsageError(f"Parameter '{name}' expects integer") from None
    value = -value if negative else value
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise UsageError(f"Parameter '{name}' expects integer")
    return value


def _scalar(name: str, kind: object, text: object) -> object:
    """One scalar QAPI member from its keyval string."""
    if not isinstance(text, str):
        raise UsageError(f"Parameters '{name}.*' are unexpected")
    if isinstance(kind, tuple):
        if text not in kind:
            raise UsageError(f"Parameter '{name.rsplit('.', 1)[-1]}' does not accept value '{text}'")
        return text
    if kind == _BOOL:
        try:
            return parse_bool(name, text)
        except OptionError as e:
            raise UsageError(str(e)) from None
    if kind == _INT:
        return strtoi64(name, text)
    if kind == _INT32:
        value = strtoi64(name, text)
        if not -(1 << 31) <= value < 1 << 31:
            raise UsageError(f"Parameter '{name}' expects int32_t")
        return value
    return text


def _listify(prefix: str, node: dict[str, object]) -> object:
    """keyval_listify, as QEMU runs it while parsing: a dict keyed only by indexes becomes a list
    (every index below the largest present), children first, in QDict order."""
    for key in qdict_order(list(node)):
        child = node[key]
        if isinstance(child, dict):
            node[key] = _listify(f"{prefix}{key}.", child)
    indexes = [k.isdigit() and k.isascii() for k in node]
    if not any(indexes):
        return node
    if not all(indexes):
        raise UsageError(f"Parameters '{prefix[:-1]}.*' used inconsistently")
    by_index = {int(k): v for k, v in node.items()}
    for i in range(max(by_index) + 1):
        if i not in by_index:
            raise UsageError(f"Parameter '{prefix}{i}' missing")
    return [by_index[i] for i in range(len(by_index))]


def _as_list(name: str, value: object) -> list[object]:
    """A QAPI list member."""
    if not isinstance(value, list):
        raise UsageError(f"Invalid parameter type for '{name}', expected: array")
    return value


def _struct(prefix: str, tree: dict[str, object], schema: dict[str, object],
            required: tuple[str, ...]) -> dict[str, object]:
    """Visit a QAPI struct: members in schema order, then unexpected keys in QDict order."""
    out: dict[str, object] = {}
    for member, kind in schema.items():
        name = prefix + member
        if member not in tree:
            if member in required:
                raise UsageError(f"Parameter '{name}' is missing")
            continue
        value = tree[member]
        if kind == "limits":
            if not isinstance(value, dict):
                raise UsageError(f"Invalid parameter type for '{name}', expected: object")
            out[member] = _struct(name + ".", value, dict.fromkeys(_THROTTLE_NAMES, _INT), ())
        elif kind == "rules":
            rules = _as_list(name, value)
            for i, rule in enumerate(rules):
                if not isinstance(rule, dict):
                    raise UsageError(f"Invalid parameter type for '{name}.{i}', expected: object")
                _struct(f"{name}.{i}.", rule, _RULE, ("match", "policy"))
            out[member] = rules
        elif kind == _U16LIST:
            items = _as_list(name, value)
            numbers = []
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise UsageError(f"Parameters '{name}.{i}.*' are unexpected")
                try:
                    number = strtou64(item)
                except (ValueError, OverflowError):
                    raise UsageError(f"Parameter '{name}.{i}' expects integer") from None
                if number > 0xFFFF:
                    raise UsageError("Parameter 'null' expects uint16_t")  # (QEMU's words for a list item)
                numbers.append(number)
            out[member] = numbers
        else:
            out[member] = _scalar(name, kind, value)
    for key in qdict_order(list(tree)):
        if key not in schema:
            raise UsageError(f"Parameter '{prefix}{key}' is unexpected")
    return out


def _tree(flat: dict[str, str]) -> dict[str, object]:
    """Dotted keyval keys as nested dicts, keeping first-insertion order at every level."""
    root: dict[str, object] = {}
    for key, value in flat.items():
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[parts[-1]] = value
    return root


class _State:
    """What QEMU keeps across objects: whether a main-loop exists yet."""
    main_loop = False


def _throttle_valid(avg: list[int], peak: list[int], burst: list[int], op_size: int) -> None:
    """throttle_is_valid: buckets bps total/read/write, iops total/read/write."""
    for base in (0, 3):
        for values in (avg, peak):
            if values[base] and (values[base + 1] or values[base + 2]):
                raise UsageError("bps/iops/max total values and read/write values cannot be used at the same time")
    if op_size and not (avg[3] or avg[4] or avg[5]):
        raise UsageError("iops size requires an iops value to be set")
    for i in range(6):
        if avg[i] > _THROTTLE_VALUE_MAX or peak[i] > _THROTTLE_VALUE_MAX:
            raise UsageError(f"bps/iops/max values must be within [0, {_THROTTLE_VALUE_MAX}]")
        if not burst[i]:
            raise UsageError("the burst length cannot be 0")
        if burst[i] > 1 and not peak[i]:
            raise UsageError("burst length set without burst rate")
        if peak[i] and burst[i] > _THROTTLE_VALUE_MAX // peak[i]:
            raise UsageError("burst length too high for this burst rate")
        if peak[i] and not avg[i]:
            raise UsageError("bps_max/iops_max require corresponding bps/iops values")
        if peak[i] and peak[i] < avg[i]:
            raise UsageError("bps_max/iops_max cannot be lower than bps/iops")


def _bucket(name: str) -> tuple[int, int]:
    """(bucket index, 0 avg / 1 max / 2 burst length) of a throttle member name."""
    kind, op = name.split("-")[:2]
    index = ("bps", "iops").index(kind) * 3 + ("total", "read", "write").index(op)
    return index, 2 if name.endswith("-length") else 1 if name.endswith("-max") else 0


def _throttle(values: dict[str, object], order: list[str]) -> None:
    """throttle-group's setters (x-* one by one, limits as a whole) and completion."""
    cfg = [[0] * 6, [0] * 6, [1] * 6]
    op_size = 0
    for key in order:
        if key == "limits":
            limits = values[key]
            assert isinstance(limits, dict)
            for name in (n for n in _THROTTLE_NAMES if n in limits and not n.endswith("-length")):
                if name == "iops-size":
                    op_size = limits[name] & 0xFFFFFFFFFFFFFFFF
                else:
                    index, part = _bucket(name)
                    cfg[part][index] = limits[name] & 0xFFFFFFFFFFFFFFFF
            for op in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write"):
                name = f"{op}-max-length"
                if name in limits:
                    if limits[name] > _UINT_MAX:
                        raise UsageError(f"{name} value must be in the range [0, {_UINT_MAX}]")
                    cfg[2][_bucket(name)[0]] = limits[name] & 0xFFFFFFFFFFFFFFFF
            _throttle_valid(cfg[0], cfg[1], cfg[2], op_size)
            continue
        value = values[key]
        assert isinstance(value, int)
        if value < 0:
            raise UsageError("Property values cannot be negative")
        if key == "x-iops-size":
            op_size = value
            continue
        index, part = _bucket(key[2:])
        if part == 2 and value > _UINT_MAX:
            raise UsageError(f"{key} value must be in therange [0, {_UINT_MAX}]")  # (sic: QEMU's words)
        cfg[part][index] = value
    _throttle_valid(cfg[0], cfg[1], cfg[2], op_size)


def _main_loop(values: dict[str, object], order: list[str]) -> None:
    """main-loop's setters: non-negative values."""
    for key in order:
        assert isinstance(values[key], int)
        if values[key] < 0:  # type: ignore[operator]
            raise UsageError(f"{key} value must be in range [0, {_INT64_MAX}]")


def _main_loop_complete(values: dict[str, object]) -> None:
    """main_loop_init: a second instance, or a thread pool QEMU cannot size."""
    if _State.main_loop:
        raise UsageError("only one main-loop instance allowed")
    low, high = values.get("thread-pool-min", 0), values.get("thread-pool-max", 64)
    assert isinstance(low, int) and isinstance(high, int)
    if low > high or not high or low > 0x7FFFFFFF or high > 0x7FFFFFFF:
        raise UsageError("bad thread-pool-min/thread-pool-max values")
    _State.main_loop = True


def _node_cpus(node: int) -> set[int]:
    """The CPUs of a host NUMA node (none for a node the host lacks)."""
    try:
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            text = f.read().strip()
    except OSError:
        return set()
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _thread_context(values: dict[str, object], order: list[str]) -> None:
    """thread-context's setters: CPU or node affinity, never both."""
    cpus: set[int] | None = None
    for key in order:
        numbers = values[key]
        assert isinstance(numbers, list)
        if cpus is not None:
            raise UsageError("Mixing CPU and node affinity not supported")
        if key == "cpu-affinity":
            cpus = set(numbers)
        else:
            cpus = set().union(*(_node_cpus(n) for n in numbers))
            if not cpus:
                raise UsageError("The nodes select no CPUs")
    if cpus is not None:
        values["cpus"] = cpus  # (applied when the object is completed)


def _credentials(qom_type: str, values: dict[str, object], name: str) -> None:
    """tls-creds-psk/x509: the directory and its first file, as QEMU looks for them."""
    if "dir" not in values:
        raise UsageError("Missing 'dir' property value")
    path = f"{values['dir']}/{name}"
    try:
        os.stat(path)
    except OSError as e:
        raise UsageError(f"Unable to access credentials {path}: {e.strerror}") from None
    raise _unsupported(qom_type, f"it would load the credentials in {path}")


def _pr_helper(qom_type: str, values: dict[str, object]) -> None:
    """pr-manager-helper: QEMU connects to the helper's socket when the object is created."""
    path = values["path"]
    assert isinstance(path, str)
    import socket  # (only here: every command line loads this module)

    raw = os.fsencode(path)
    if len(raw) > _SUN_PATH:
        raise UsageError(f"UNIX socket path '{path}' is too long\nPath must be less than {_SUN_PATH} bytes")
    try:
        if len(raw) == _SUN_PATH:  # (QEMU fills sun_path without a NUL, which Python refuses)
            os.stat(raw)
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(raw or b"\0" * _SUN_PATH)  # (QEMU gives the whole sun_path: '' is abstract)
    except OSError as e:
        raise UsageError(f"Failed to connect to '{path}': {e.strerror}") from None
    raise _unsupported(qom_type, "it would talk to the persistent reservation helper")


def _unsupported(qom_type: str, why: str) -> UsageError:
    return UsageError(f"qcowdisk does not support objects of type '{qom_type}' ({why})")


def _complete(qom_type: str, values: dict[str, object]) -> None:
    """The type's completion checks (after the id is registered)."""
    if qom_type == "main-loop":
        _main_loop_complete(values)
    cpus = values.get("cpus")
    if isinstance(cpus, set) and not cpus & os.sched_getaffinity(0):  # sched_setaffinity's EINVAL
        raise UsageError(f"Setting CPU affinity failed: {os.strerror(22)}")
    if qom_type == "tls-cipher-suites" and "priority" not in values:
        raise UsageError("'priority' property is not set")
    if qom_type == "tls-creds-psk":
        _credentials(qom_type, values, "keys.psk")
    if qom_type == "tls-creds-x509":
        _credentials(qom_type, values, "ca-cert.pem")
    if qom_type == "tls-creds-anon" and values.get("endpoint") == "server" and "dir" in values \
            and os.path.exists(f"{values['dir']}/dh-params.pem"):
        raise _unsupported(qom_type, "it would load Diffie-Hellman parameters")
    if qom_type == "secret_keyring":
        raise _unsupported(qom_type, "it reads the kernel keyring")
    if qom_type == "pr-manager-helper":
        _pr_helper(qom_type, values)


_SETTERS: dict[str, Callable[[dict[str, object], list[str]], None]] = {
    "throttle-group": _throttle, "main-loop": _main_loop, "thread-context": _thread_context}


def nest(flat: dict[str, str]) -> dict[str, object]:
    """The end of keyval_parse: dotted keys as nested dicts, those keyed by indexes as lists
    (refusing a missing index or indexes mixed with names). Raises UsageError."""
    tree = _listify("", _tree(flat))
    assert isinstance(tree, dict)  # (top-level keys are names: keyval refuses an index there)
    return tree


def create(qom_type: str, tree: dict[str, object], check_id: Callable[[], None],
           register: Callable[[], None]) -> None:
    """Check an object of `qom_type` from its nested keyval pairs (without qom-type and id):
    QAPI members, `check_id`, setters, `register` (the id), completion. Raises UsageError."""
    values = _struct("", tree, SCHEMAS[qom_type], _REQUIRED.get(qom_type, ()))
    check_id()
    if qom_type == "authz-listfile":  # in QEMU's schema, not built into qemu-img
        raise UsageError(f"invalid object type: {qom_type}")
    order = qdict_order(list(values))
    if "loaded" in values:  # the only failing setter of the TLS and keyring types
        raise UsageError(f"Property '{qom_type}.loaded' is not writable")
    if qom_type in _SETTERS:
        _SETTERS[qom_type](values, order)
    register()
    _complete(qom_type, values)


def reset() -> None:
    """Forget the main-loop created by an earlier command line (one qemu-img run each)."""
    _State.main_loop = False


__all__ = ["create", "nest", "help_text", "reset", "strtoi64", "SCHEMAS", "HELP"]
