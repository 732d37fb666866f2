//! A test guest for networking: the standard vm-rs initramfs plus a small busybox script that
//! runs next to `vmrs-init` and reports on the console. Parameters come from the kernel
//! command line (ignored by the kernel and by `vmrs-init`):
//!
//! * `nettest.httpd=1` — serve `hello from <ip>` with busybox `httpd` on port 80;
//! * `nettest.fetch=URL` — fetch URL until it works (30 tries), then print
//!   `NETTEST fetch ok: <body>` (or `NETTEST fetch failed`);
//! * `nettest.ping=IP` — ping IP until it answers (10 tries), then print
//!   `NETTEST ping ok IP` (or `NETTEST ping failed IP`).
//!
//! `/init` is the script's launcher; it `exec`s `vmrs-init`, which stays PID 1.

use std::path::PathBuf;
use tokio::sync::OnceCell;

const LAUNCHER: &str = "#!/bin/sh\n/bin/nettest </dev/null >/dev/console 2>&1 &\nexec /sbin/vmrs-init\n";

const NETTEST: &str = r#"#!/bin/sh
# wait for vmrs-init to mount /proc and configure eth0
while [ ! -e /proc/cmdline ]; do sleep 1; done
for w in $(cat /proc/cmdline); do
  case "$w" in
    nettest.httpd=1) H=1 ;;
    nettest.fetch=*) F="${w#nettest.fetch=}" ;;
    nettest.ping=*) P="${w#nettest.ping=}" ;;
  esac
done
i=0
while ! ip -4 addr show dev eth0 2>/dev/null | grep -q inet; do
  i=$((i+1)); [ $i -gt 60 ] && break; sleep 1
done
ADDR=$(ip -4 addr show dev eth0 | awk '/inet /{print $2}')
if [ -n "$H" ]; then
  mkdir -p /tmp/www
  echo "hello from ${ADDR%/*}" > /tmp/www/index.html
  httpd -p 80 -h /tmp/www && echo "NETTEST httpd up"
fi
if [ -n "$F" ]; then
  ok=
  for i in $(seq 1 30); do
    if wget -q -O /tmp/page "$F"; then ok=1; break; fi
    sleep 1
  done
  if [ -n "$ok" ]; then echo "NETTEST fetch ok: $(cat /tmp/page)"; else echo "NETTEST fetch failed"; fi
fi
if [ -n "$P" ]; then
  ok=
  for i in $(seq 1 10); do
    if ping -c 1 -W 2 "$P" >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  if [ -n "$ok" ]; then echo "NETTEST ping ok $P"; else echo "NETTEST ping failed $P"; fi
fi
"#;

/// The network test initramfs (built once per test binary).
pub async fn initramfs() -> PathBuf {
    static IMG: OnceCell<PathBuf> = OnceCell::const_new();
    IMG.get_or_init(|| async {
        let assets = super::guest::assets().await;
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmrs-net-initramfs.img");
        let mut spec = assets.initramfs_spec(&out);
        spec.extra
            .file_bytes("init", LAUNCHER, 0o755)
            .expect("init")
            .file_from("sbin/vmrs-init", &assets.init, 0o755)
            .expect("vmrs-init")
            .file_bytes("bin/nettest", NETTEST, 0o755)
            .expect("nettest");
        for applet in ["seq", "awk", "grep", "sleep"] {
            let _ = spec.extra.symlink(&format!("bin/{applet}"), "busybox");
        }
        vm_rs::guest::build_initramfs(spec)
            .await
            .expect("build test initramfs");
        out
    })
    .await
    .clone()
}

/// The guest kernel.
pub async fn kernel() -> PathBuf {
    super::guest::assets().await.kernel.clone()
}
