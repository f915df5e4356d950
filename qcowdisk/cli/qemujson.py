"""JSON as QEMU prints it (qobject_to_json_pretty): its indentation and its string escaping."""

from __future__ import annotations

import json


def qemu_json(value: object, level: int = 0) -> str:
    """QEMU's pretty JSON (qobject_to_json_pretty): json.dumps(indent=4), except that an empty
    list or dict still opens and closes on lines of its own."""
    pad = "    " * level
    if isinstance(value, dict):
        items = [f"{pad}    {_qemu_json_string(str(k))}: {qemu_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(value, list):
        items = [f"{pad}    {qemu_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    if isinstance(value, str):
        return _qemu_json_string(value)
    return json.dumps(value)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _qemu_json_string(text: str) -> str:
    """A JSON string as QEMU's to_json writes it: control characters, DEL and everything past
    ASCII as \\uXXXX (upper-case hex, surrogate pairs past the BMP)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 | code >> 10, 0xDC00 | code & 0x3FF))
        else:
            out.append("\\u%04X" % code)
    out.append('"')
    return "".join(out)

