"""--object types other than `secret` that qemu-img 7.2 creates: checked as QEMU checks them
(members, setters, completion; messages and exit status), then ignored by the image operation.

Each case runs `qemu-img info --object ... a.qcow2` and the same words through qcowdisk and
compares exit status, stdout and stderr.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clirun import qcowdisk_in, same_as_qemu_img
from qemutools import qemu_img

THROTTLE = [
    "throttle-group,id=t", "throttle-group", "throttle-group,id=t,foo=1", "throttle-group,id=t,x-iops-total=x",
    "throttle-group,id=t,x-iops-total=-1", "throttle-group,id=t,x-iops-total=1000000000000000",
    "throttle-group,id=t,x-iops-total=1000000000000001", "throttle-group,id=t,x-iops-total-max=5,x-iops-total=10",
    "throttle-group,id=t,limits.iops-total=5", "throttle-group,id=t,limits.foo=5", "throttle-group,id=t,limits=5",
    "throttle-group,id=t,x-iops-size=3", "throttle-group,id=t,x-bps-read-max-length=0",
    "throttle-group,id=t,x-bps-read-max-length=5", "throttle-group,id=t,x-bps-read-max-length=5,x-bps-read-max=4,x-bps-read=3",
    "throttle-group,id=t,limits.iops-total=5,x-iops-total=3", "throttle-group,id=0t",
    "throttle-group,id=t,x-bps-read-max-length=99999999999", "throttle-group,id=t,limits.bps-read-max-length=99999999999",
    "throttle-group,id=t,limits.bps-read=-1", "throttle-group,id=t,limits.bps-read=x",
    "throttle-group,id=t,x-iops-total=0x10,x-iops-read=010", "throttle-group,id=t,x-iops-total-max=1",
    "throttle-group,id=t,x-iops-total=1,x-iops-read=1", "throttle-group,id=t,x-bps-total=-1,x-iops-total=-2",
    "throttle-group,id=t,x-bps-total=x,x-iops-total=y", "throttle-group,id=t,limits.iops-total=x,x-iops-total=y",
    "throttle-group,id=t,x-iops-total=5,x-iops-total-max=1000000000000000,x-iops-total-max-length=2",
    "throttle-group,id=t,x-iops-total= 5", "throttle-group,id=t,x-iops-total=5 ", "throttle-group,id=t,x-iops-total.a=1",
    "throttle-group,id=t,limits.iops-total=5,limits.iops-total-max=10,limits.iops-total-max-length=3,limits.iops-size=4k",
    "throttle-group,id=t,limits.iops-total=5,limits.iops-total-max=10,limits.iops-total-max-length=3,limits.iops-size=4096",
    "throttle-group,id=t,x-bps-write=10,x-bps-write-max=20,x-bps-write-max-length=60,x-iops-size=512,x-iops-write=1",
]
MAIN_LOOP = [
    "main-loop,id=m", "main-loop,id=m,aio-max-batch=-1", "main-loop,id=m,aio-max-batch=x",
    "main-loop,id=m,thread-pool-min=5,thread-pool-max=2", "main-loop,id=m,thread-pool-max=0",
    "main-loop,id=m,thread-pool-min=-1", "main-loop,id=m,thread-pool-max=99999999999",
    "main-loop,id=m,aio-max-batch=99999999999999", "main-loop,id=m,foo=1", "main-loop,id=m,thread-pool-min=x,aio-max-batch=y",
    "main-loop,id=m,thread-pool-min=2,thread-pool-max=8",
]
THREAD_CONTEXT = [
    "thread-context,id=c", "thread-context,id=c,cpu-affinity=0", "thread-context,id=c,cpu-affinity.0=0",
    "thread-context,id=c,cpu-affinity.0=5000", "thread-context,id=c,cpu-affinity.0=70000",
    "thread-context,id=c,cpu-affinity.0=x", "thread-context,id=c,cpu-affinity.0=-1", "thread-context,id=c,cpu-affinity.1=0",
    "thread-context,id=c,cpu-affinity.0=0,cpu-affinity.0=1", "thread-context,id=c,node-affinity.0=0",
    "thread-context,id=c,node-affinity.0=5", "thread-context,id=c,node-affinity.0=0,cpu-affinity.0=0",
    "thread-context,id=c,cpu-affinity.0=0,node-affinity.0=0", "thread-context,id=c,cpu-affinity.0=0,cpu-affinity.1=0",
    "thread-context,id=c,cpu-affinity.x=0", "thread-context,id=c,cpu-affinity.0=0,cpu-affinity.1=x",
    "thread-context,id=c,cpu-affinity.0=0,cpu-affinity.x=0",
]
AUTHZ = [
    "authz-simple,id=a", "authz-simple,id=a,identity=bob", "authz-simple,id=a,identity=", "authz-simple,id=a,identity.x=1",
    "authz-list,id=a", "authz-list,id=a,policy=allow", "authz-list,id=a,policy=x",
    "authz-list,id=a,rules.0.match=bob,rules.0.policy=allow", "authz-list,id=a,rules=x", "authz-list,id=a,rules.0.match=bob",
    "authz-list,id=a,rules.0.match=bob,rules.0.policy=x",
    "authz-list,id=a,rules.0.match=bob,rules.0.policy=deny,rules.0.format=glob",
    "authz-list,id=a,rules.0.match=bob,rules.0.policy=deny,rules.0.format=x",
    "authz-list,id=a,rules.0.match=bob,rules.0.policy=deny,rules.0.foo=x",
    "authz-listfile,id=a", "authz-listfile,id=a,filename=/nonexist", "authz-listfile,id=0x,filename=a",
    "authz-list-file,id=a",
]
TLS = [
    "tls-creds-anon,id=t", "tls-creds-anon,id=t,endpoint=server", "tls-creds-anon,id=t,endpoint=x",
    "tls-creds-anon,id=t,dir=/nonexistent", "tls-creds-anon,id=t,endpoint=server,dir=/nonexistent",
    "tls-creds-anon,id=t,endpoint=server,dir=.", "tls-creds-anon,id=t,verify-peer=x", "tls-creds-anon,id=t,priority=NORMAL",
    "tls-creds-anon,id=t,loaded=on", "tls-creds-anon,id=t,dir=x,loaded=on,verify-peer=x",
    "tls-creds-psk,id=t", "tls-creds-psk,id=t,dir=.", "tls-creds-psk,id=t,endpoint=server,dir=.",
    "tls-creds-psk,id=t,username=bob", "tls-creds-psk,id=t,dir=/nonexistent", "tls-creds-psk,id=t,dir=a.qcow2",
    "tls-cipher-suites,id=t", "tls-cipher-suites,id=t,priority=BOGUS", "tls-cipher-suites,id=t,dir=/nonexistent",
    "tls-cipher-suites,id=t,priority=x,loaded=on",
    "tls-creds-x509,id=t", "tls-creds-x509,id=t,dir=/nonexistent", "tls-creds-x509,id=t,dir=.",
    "tls-creds-x509,id=t,dir=.,endpoint=server,verify-peer=off", "tls-creds-x509,id=t,sanity-check=x",
]
OTHER = [
    "secret_keyring,id=s", "secret_keyring,id=s,serial=x", "secret_keyring,id=s,serial=99999999999",
    "secret_keyring,id=s,serial=1,foo=2", "secret_keyring,id=t,serial=1,loaded=on", "secret_keyring,id=s,serial=1,format=x",
    "pr-manager-helper,id=p", "pr-manager-helper,id=p,path=/nonexistent", "pr-manager-helper,id=p,path=a.qcow2",
    "foo,help", "can-bus,help", "throttle-group,id=t,foo=1,help", "pr-manager-helper,id=p,path=",
    "pr-manager-helper,id=p,path=/tmp", "pr-manager-helper,id=p,path=" + "a" * 108,
    "pr-manager-helper,id=p,path=" + "a" * 109,
]
# keyval's lists are made while parsing: a missing index is refused before anything else
LISTS = [
    "thread-context,cpu-affinity.0=0x10,node-affinity.1=off", "thread-context,id=c,cpu-affinity.1=1,help",
    "foo,cpu-affinity.1=1", "thread-context,id=a,node-affinity.1=0,cpu-affinity.0=4294967296",
    "authz-list,id=0a,rules.1.match=x,policy=.", "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.x=1",
    "thread-context,id.x=1", "secret,id.x=1", "secret,id.0=1", "secret,id=s,a.0x=1", "secret,id=s,a.0=1",
    "authz-simple,id=a,identity.0=x",
]
HELP = [f"{t},help" for t in ("throttle-group", "main-loop", "thread-context", "authz-simple", "authz-list",
                               "authz-list-file", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
                               "tls-cipher-suites", "secret_keyring", "pr-manager-helper", "authz-listfile")]


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image to run `info` on."""
    d = tmp_path_factory.mktemp("objects")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "1M")
    return d


@pytest.mark.parametrize("objdef", THROTTLE + MAIN_LOOP + THREAD_CONTEXT + AUTHZ + TLS + OTHER + HELP + LISTS)
def test_object_type(d: Path, objdef: str) -> None:
    """Each type's checks, messages and exit status as qemu-img's; an accepted object changes
    nothing in the output."""
    same_as_qemu_img(d, "info", ["--object", objdef, "a.qcow2"])


@pytest.mark.parametrize("objects", [
    ["main-loop,id=a", "main-loop,id=b"], ["main-loop,id=a", "main-loop,id=a"],
    ["throttle-group,id=a", "throttle-group,id=a"], ["throttle-group,id=a", "secret,id=a,data=x"],
    ["secret,id=a,data=x", "authz-simple,id=a,identity=x"], ["main-loop,id=a", "main-loop,id=0b,foo=1"],
])
def test_objects_together(d: Path, objects: list[str]) -> None:
    """Ids are shared by all types; one main-loop per command line."""
    same_as_qemu_img(d, "info", [*(w for o in objects for w in ("--object", o)), "a.qcow2"])


@pytest.mark.parametrize("objdef", ["secret_keyring,id=s,serial=1", "tls-creds-x509,id=t,dir=x509",
                                    "tls-creds-psk,id=t,dir=x509", "pr-manager-helper,id=p,path=sock",
                                    "authz-pam,id=a", "iothread,id=a"])
def test_refused_types(d: Path, objdef: str) -> None:
    """What qcowdisk cannot reproduce (kernel keyring, credential files, a helper on a socket,
    types QEMU has but qemu-img lacks) is refused, naming the type."""
    import socket
    (d / "x509").mkdir(exist_ok=True)
    (d / "x509" / "ca-cert.pem").write_text("")
    (d / "x509" / "keys.psk").write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        (d / "sock").unlink(missing_ok=True)
        s.bind(str(d / "sock"))
        s.listen()
        status, out, err = qcowdisk_in(d, "info", ["--object", objdef, "a.qcow2"])
    assert (status, out) == (1, "")
    assert err.startswith(f"qcowdisk: qcowdisk does not support objects of type '{objdef.split(',')[0]}'")


@pytest.mark.parametrize("objdef", ["main-loop,id=m,thread-pool-max=4", "throttle-group,id=t,x-iops-total=-1"])
def test_other_commands(d: Path, objdef: str) -> None:
    """The commands that take --object themselves (resize, amend, bitmap) and compare (which
    exits 2 on a bad one) treat these types as info does."""
    for command, rest in (("compare", ["a.qcow2", "a.qcow2"]), ("resize", ["a.qcow2", "+0"]),
                          ("amend", ["-o", "help", "a.qcow2"]), ("bitmap", ["--remove", "a.qcow2", "nob"]),
                          ("check", ["a.qcow2"])):
        same_as_qemu_img(d, command, ["--object", objdef, *rest])
