#!/usr/bin/env python3
"""Write the seed corpora in corpus-seeds/ (small inputs modelled on the unit and integration
tests' fixtures). Run from anywhere: python3 fuzz/make-seeds.py. Idempotent."""
import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus-seeds")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


# image references (oci/reference.rs tests)
for i, r in enumerate([
    "alpine", "alpine:3.20", "docker.io/library/alpine:latest", "ghcr.io/o/r:tag",
    "localhost:5000/x/y@" + digest(b"x"), "127.0.0.1:5000/a/b:c", "[::1]:5000/n",
    "UPPER/case", "a//b", "alpine@sha512:" + "0" * 128,
]):
    put("oci_reference", f"ref{i}", r)

# manifests and indexes (oci/manifest.rs tests, tests/support/oci_layout.rs)
def desc(mt, data, **kw):
    return dict(mediaType=mt, digest=digest(data), size=len(data), **kw)

oci_manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": desc("application/vnd.oci.image.config.v1+json", b"{}"),
    "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", b"l1"),
               desc("application/vnd.oci.image.layer.v1.tar", b"l2")],
}
docker_manifest = dict(oci_manifest, mediaType="application/vnd.docker.distribution.manifest.v2+json")
docker_manifest["layers"] = [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", b"d")]
index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        desc("application/vnd.oci.image.manifest.v1+json", b"m1", platform={"os": "linux", "architecture": "amd64"}),
        desc("application/vnd.oci.image.manifest.v1+json", b"m2", platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        desc("application/vnd.oci.image.manifest.v1+json", b"m3", platform={"os": "unknown", "architecture": "unknown"}),
    ],
}
put("oci_manifest", "oci", b"\0" + json.dumps(oci_manifest).encode())
put("oci_manifest", "docker", b"\4" + json.dumps(docker_manifest).encode())
put("oci_manifest", "index", b"\1" + json.dumps(index).encode())
put("oci_manifest", "list-no-type", b"\3" + json.dumps({k: v for k, v in index.items() if k != "mediaType"}).encode())

# image config (oci/config.rs tests)
config = {
    "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
    "config": {"User": "1000:1000", "Env": ["PATH=/usr/bin", "EMPTY", "A=b=c"],
               "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "WorkingDir": "/app",
               "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "abc/tcp": {}, "8080": {}},
               "Labels": {"a": "b"}, "StopSignal": "SIGTERM", "Volumes": {"/data": {}}},
    "rootfs": {"type": "layers", "diff_ids": [digest(b"a"), digest(b"b")]},
}
put("oci_config", "full", json.dumps(config))
put("oci_config", "nulls", '{"architecture":"arm64","os":"linux","config":{"Env":null,"Cmd":null}}')

# QMP (driver/qemu/qmp.rs tests): greeting, capabilities reply, events around a reply
greet = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n'
put("qmp", "status", greet + '{"return": {}, "id": 1}\n{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\n'
    '{"return": {"status": "paused", "running": false}, "id": 2}\n{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\n')
put("qmp", "error", greet + '{"return": {}, "id": 1}\n{"error": {"class": "GenericError", "desc": "nope"}, "id": 2}\n{"event": "RESUME"}\n')
put("qmp", "garbage", "not json\n")

# Cloud Hypervisor API (driver/cloud_hypervisor/api.rs tests); first byte picks the call
def http(status, reason, body=b"", headers=None):
    h = f"HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\n"
    for k, v in (headers or {}).items():
        h += f"{k}: {v}\r\n"
    return h.encode() + b"\r\n" + body

info = json.dumps({"state": "Running", "config": {"cpus": {"boot_vcpus": 1}}}).encode()
counters = json.dumps({"_disk0": {"read_bytes": 1, "write_ops": 2}, "_net1": {"rx_bytes": 3}}).encode()
err = b'["Error from API","The VM could not be snapshotted","GetNestedState"]'
put("ch_api", "status", b"\0" + http(200, "OK", info, {"Content-Type": "application/json", "Content-Length": len(info)}))
put("ch_api", "info-eof", b"\1" + http(200, "OK", info))
put("ch_api", "counters", b"\2" + http(200, "OK", counters, {"Content-Length": len(counters)}))
put("ch_api", "add-net", b"\3" + http(200, "OK", b'{"id":"_net2","bdf":"0000:00:05.0"}', {"content-length": 35}))
put("ch_api", "pause-204", b"\4" + http(204, "No Content"))
put("ch_api", "raw-error", b"\5" + http(500, "Internal Server Error", err, {"Content-Length": len(err)}))
put("ch_api", "not-found", b"\0" + http(404, "Not Found", b"", {"Content-Length": 0}))
put("ch_api", "chunked", b"\5" + http(200, "OK", b"5\r\nhello\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}))

# CH event monitor (driver/cloud_hypervisor/events.rs tests); first byte: number of cuts
sample = ('{\n  "timestamp": {\n    "secs": 0,\n    "nanos": 5\n  },\n  "source": "vm",\n  "event": "paused",\n'
          '  "properties": null\n}\n\n{\n  "timestamp": {\n    "secs": 1,\n    "nanos": 0\n  },\n'
          '  "source": "virtio-device",\n  "event": "activated",\n  "properties": {\n    "id": "_disk0"\n  }\n}\n\n')
put("ch_events", "sample", b"\3\x10\x40\x07" + sample.encode())
put("ch_events", "boot", b"\0" + b'{"source":"vmm","event":"starting"}\n\n{"source":"vm","event":"booted"}\n\n{"source":"vmm","event":"shutdown"}\n\n')

# serial readiness (console.rs tests)
put("serial_ready", "ready", b"\2\x05\x30" + b"[    0.5] booting\r\nvmrs-init: up\r\nVMRS_READY 10.0.2.15\r\n")
put("serial_ready", "v6", b"\0" + b"noise VMRS_READY 1.1.1.1\nVMRS_READY fd00::2\n")
put("serial_ready", "long", b"\1\x80" + b"x" * 300 + b"VMRS_READY 9.9.9.9\nVMRS_READY 127.0.0.1\n")

# agent frames (vmrs-proto)
def frame(ty, stream, payload=b""):
    return struct.pack(">IBI", 5 + len(payload), ty, stream) + payload

def b(x):
    return struct.pack(">I", len(x)) + x

def entry(kind, mode, size, path, target=b""):
    return frame(0x22, 1, struct.pack(">BIQ", kind, mode, size) + b(path) + b(target))

hello_ok = frame(0x81, 0, struct.pack(">H", 1) + b(b"vmrs-init 0.2.0"))
exec_req = frame(0x10, 1, struct.pack(">I", 2) + b(b"/bin/echo") + b(b"hi") + struct.pack(">I", 1) + b(b"A=b")
                 + b"\1" + b(b"/tmp") + b"\0" + b"\1")
all_frames = (frame(0x01, 0, struct.pack(">H", 1)) + hello_ok + frame(0x02, 0, struct.pack(">Q", 7))
              + exec_req + frame(0x11, 1, b(b"in")) + frame(0x12, 1, struct.pack(">i", 15))
              + frame(0x91, 1, b(b"out")) + frame(0x92, 1, b(b"err")) + frame(0x93, 1, struct.pack(">i", 0))
              + frame(0x20, 2, b(b"/tmp") + b(b"x")) + frame(0x21, 3, b(b"/etc")) + frame(0xe0, 1, b(b"no"))
              + frame(0x03, 0) + frame(0x83, 0) + frame(0xa0, 2) + frame(0x90, 1, struct.pack(">I", 42)))
put("agent_proto", "all", b"\4\x09\x21\x03\x50" + all_frames)
put("agent_proto", "bad-length", b"\0" + struct.pack(">I", 3) + b"\1")

tree = (entry(1, 0o755, 0, b"") + entry(0, 0o644, 5, b"file") + frame(0x23, 1, b(b"hello"))
        + entry(1, 0o700, 0, b"sub") + entry(2, 0o777, 0, b"sub/link", b"../../outside/sentinel")
        + entry(0, 0o4755, 2, b"sub/suid") + frame(0x23, 1, b(b"ok")) + frame(0x24, 1))
escape = (entry(2, 0o777, 0, b"", b"../outside") + entry(0, 0o644, 3, b"sentinel") + frame(0x23, 1, b(b"bad"))
          + frame(0x24, 1))
escape2 = (entry(1, 0o755, 0, b"") + entry(2, 0o777, 0, b"l", b"/") + entry(0, 0o644, 1, b"l/x")
           + frame(0x23, 1, b(b"!")) + entry(0, 0o644, 0, b"../x") + frame(0x24, 1))
put("agent_host", "copy", b"\0" + hello_ok + tree)
put("agent_host", "copy-escape", b"\1" + hello_ok + escape)
put("agent_host", "copy-escape2", b"\0" + hello_ok + escape2)
put("agent_host", "exec", b"\2" + hello_ok + frame(0x90, 1, struct.pack(">I", 42)) + frame(0x91, 1, b(b"out"))
    + frame(0x92, 1, b(b"err")) + frame(0x93, 1, struct.pack(">i", 3)))
put("agent_host", "ping", b"\3" + frame(0x91, 9, b(b"stale")) + hello_ok + frame(0x82, 1, struct.pack(">Q", 1)))
put("agent_host", "refused", b"\3" + frame(0xe0, 0, b(b"unsupported protocol version")))
put("agent_guest", "copy", b"\0" + tree)
put("agent_guest", "copy-new", b"\1" + tree)
put("agent_guest", "copy-escape", b"\1" + escape)
put("agent_guest", "copy-escape2", b"\0" + escape2)
put("agent_guest", "user", b"\x80" + b"app:wheel\0root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    b"\0root:x:0:\nwheel:x:10:app\n")
put("agent_guest", "uid", b"\x81" + b"1000\0app:x:1000:1000::/home/app:/bin/sh\n\0")

# DHCP lease script output (vmrs-guest/src/dhcp.rs tests)
put("guest_dhcp", "slirp", "udhcpc: started\nlease ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 1.1.1.1\n")
put("guest_dhcp", "empty-fields", "lease ip=192.168.1.9 subnet= router= dns=")
put("guest_dhcp", "two", "lease ip=10.0.0.2 subnet=255.0.0.0 router=10.0.0.1 10.0.0.9 dns=\nlease ip=10.0.0.3 subnet=255.255.0.255\n")

# kernel command line (vmrs-guest/src/cmdline.rs tests)
put("guest_cmdline", "net", "console=ttyS0 reboot=t panic=-1 vmrs.ip=10.0.2.15/24 vmrs.gw=10.0.2.2 "
    "vmrs.dns=10.0.2.3,1.1.1.1 vmrs.hostname=web-1\n")
put("guest_cmdline", "root", "vmrs.root=/dev/vda vmrs.rootfstype=erofs vmrs.rootflags=ro vmrs.root=serial:vmrs-root vmrs.shell=1")
put("guest_cmdline", "bad", "vmrs.ip=10.0.2.15 vmrs.ip=300.1.1.1/24 vmrs.ip=fd00::2/129 vmrs.gw=x vmrs.dns=1.1.1.1,bad "
    "vmrs.hostname=-x vmrs.root=/dev/../etc vmrs.ip=dhcp")
