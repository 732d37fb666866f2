//! Host devices for TAP and bridge networks, inside a network namespace each test creates:
//! prepare creates tagged TAPs/bridges/NAT, teardown and reconcile remove exactly what vm-rs
//! made, and nothing someone else made.

#[path = "support/netns.rs"]
mod netns_support;

use netns_support::TestNetns;
use std::path::{Path, PathBuf};
use vm_rs::config::{GuestAddress, NetworkAttachment};
use vm_rs::net::host::{self, NetState};
use vm_rs::net::tap_name;

fn vm_dir(home: &Path, name: &str) -> PathBuf {
    let d = home.join("vms").join(name);
    std::fs::create_dir_all(&d).expect("vm dir");
    d
}

fn bridge(ns: &TestNetns, name: &str, gw: &str, nat: bool) -> NetworkAttachment {
    bridge_in(ns.path(), name, gw, nat)
}

fn bridge_in(netns: PathBuf, name: &str, gw: &str, nat: bool) -> NetworkAttachment {
    NetworkAttachment::Bridge {
        bridge: name.into(),
        gateway: gw.parse().expect("cidr"),
        nat,
        address: GuestAddress::Auto,
        dns: vec![],
        port_forwards: vec![],
        mac: None,
        netns: Some(netns),
    }
}

fn nft_tables(ns: &TestNetns) -> String {
    let out = ns.exec(&["nft", "list", "tables"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn bridge_with_nat_is_created_tagged_and_removed() {
    let ns = TestNetns::new("br");
    let home = tempfile::tempdir().expect("home");
    let dir = vm_dir(home.path(), "vm1");
    let att = [bridge(&ns, "vmrsbr0", "10.99.0.1/24", true)];
    let state = host::prepare(home.path(), "vm1", &dir, &att)
        .await
        .expect("prepare");
    let tap = tap_name("vm1", 0);
    assert_eq!(state.netns(), Some(ns.path().as_path()));
    let links = ns.links();
    assert!(links.contains(&"vmrsbr0".to_string()), "{links:?}");
    assert!(links.contains(&tap), "{links:?}");
    let detail = ns.ip(&["-d", "link", "show", &tap]);
    assert!(detail.contains("master vmrsbr0"), "{detail}");
    assert!(
        detail.contains("tun type tap") || detail.contains("tap"),
        "{detail}"
    );
    assert!(detail.contains("alias vmrs:"), "{detail}");
    let addr = ns.ip(&["-4", "addr", "show", "vmrsbr0"]);
    assert!(addr.contains("10.99.0.1/24"), "{addr}");
    assert!(nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    let fwd = ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
    // the record is on disk and says what was made
    let saved = NetState::load(&dir).expect("load").expect("some");
    assert_eq!(saved, state);
    assert_eq!(saved.devices.len(), 2);
    // the NIC names the TAP, and the guest gets an address in the subnet
    assert!(state
        .nics
        .iter()
        .any(|n| matches!(&n.backend, vm_rs::net::NicBackend::Tap { ifname, .. } if *ifname == tap)));
    let cl = state.guest_cmdline();
    assert!(cl[0].starts_with("vmrs.ip=10.99.0."), "{cl:?}");

    host::teardown(&state).await.expect("teardown");
    let links = ns.links();
    assert!(!links.iter().any(|l| l == &tap || l == "vmrsbr0"), "{links:?}");
    assert!(!nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    // teardown twice is fine
    host::teardown(&state).await.expect("teardown again");
}

#[tokio::test]
async fn devices_made_before_the_record_named_them_are_still_torn_down() {
    // A starter SIGKILLed between creating the bridge (and NAT table, and TAP) and saving the
    // record that lists them leaves a net.json naming only the plan (seen in the chaos
    // harness: a NAT bridge outlived every VM). Teardown of that record removes them.
    let ns = TestNetns::new("ur");
    let home = tempfile::tempdir().expect("home");
    let dir = vm_dir(home.path(), "vm1");
    let att = [bridge(&ns, "vmrsbr7", "10.97.0.1/24", true)];
    let state = host::prepare(home.path(), "vm1", &dir, &att)
        .await
        .expect("prepare");
    let tap = tap_name("vm1", 0);
    assert!(ns.links().contains(&"vmrsbr7".to_string()));
    assert!(nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    let mut unrecorded = state.clone();
    unrecorded.devices.clear();
    // a foreign bridge and TAP of the same names as another plan's are never touched
    ns.ip(&["link", "add", "foreignbr", "type", "bridge"]);
    let mut foreign = unrecorded.clone();
    if let Some(n) = foreign.nics.first_mut() {
        n.backend =
            serde_json::from_value(serde_json::json!({"type": "tap", "ifname": "foreignbr"})).expect("nic");
    }
    host::teardown(&foreign)
        .await
        .expect("teardown of a plan naming a foreign device");
    assert!(ns.links().contains(&"foreignbr".to_string()), "{:?}", ns.links());

    host::teardown(&unrecorded).await.expect("teardown");
    let links = ns.links();
    assert!(!links.iter().any(|l| l == &tap || l == "vmrsbr7"), "{links:?}");
    assert!(!nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    host::teardown(&unrecorded).await.expect("teardown again");
}

#[tokio::test]
async fn shared_bridge_lives_until_its_last_vm_and_foreign_devices_are_kept() {
    let ns = TestNetns::new("shared");
    // a bridge someone else made
    ns.ip(&["link", "add", "userbr", "type", "bridge"]);
    let home = tempfile::tempdir().expect("home");
    let a_dir = vm_dir(home.path(), "a");
    let b_dir = vm_dir(home.path(), "b");
    let att = [
        bridge(&ns, "vmrsbr1", "10.98.0.1/24", false),
        bridge(&ns, "userbr", "10.97.0.1/24", false),
    ];
    let a = host::prepare(home.path(), "a", &a_dir, &att).await.expect("a");
    let b = host::prepare(home.path(), "b", &b_dir, &att).await.expect("b");
    let ip_a = a.nics[0].guest.address().expect("addr");
    let ip_b = b.nics[0].guest.address().expect("addr");
    assert_ne!(ip_a, ip_b, "derived addresses differ");
    let ports = ns.ip(&["link", "show", "master", "vmrsbr1"]);
    assert!(ports.contains(&tap_name("a", 0)) && ports.contains(&tap_name("b", 0)));
    host::teardown(&a).await.expect("teardown a");
    let links = ns.links();
    assert!(
        links.contains(&"vmrsbr1".to_string()),
        "b still uses it: {links:?}"
    );
    assert!(!links.contains(&tap_name("a", 0)));
    host::teardown(&b).await.expect("teardown b");
    let links = ns.links();
    assert!(!links.contains(&"vmrsbr1".to_string()), "{links:?}");
    assert!(
        links.contains(&"userbr".to_string()),
        "foreign bridge kept: {links:?}"
    );
    assert!(
        !links.iter().any(|l| l.starts_with("vmrs") && l != "vmrsbr1"),
        "{links:?}"
    );
}

#[tokio::test]
async fn tap_gets_host_address_and_reconcile_reaps_after_a_crash() {
    let ns = TestNetns::new("tap");
    let home = tempfile::tempdir().expect("home");
    let tap_att = NetworkAttachment::Tap {
        ifname: None,
        host_address: Some("10.96.0.1/30".parse().expect("cidr")),
        address: GuestAddress::Auto,
        dns: vec![],
        mac: None,
        netns: Some(ns.path()),
    };
    let dead_dir = vm_dir(home.path(), "dead");
    let live_dir = vm_dir(home.path(), "live");
    let dead = host::prepare(home.path(), "dead", &dead_dir, std::slice::from_ref(&tap_att))
        .await
        .expect("dead");
    let live_att = [bridge(&ns, "vmrsbr2", "10.95.0.1/24", true)];
    let live = host::prepare(home.path(), "live", &live_dir, &live_att)
        .await
        .expect("live");
    let dead_tap = tap_name("dead", 0);
    let addr = ns.ip(&["-4", "addr", "show", &dead_tap]);
    assert!(addr.contains("10.96.0.1/30"), "{addr}");
    assert_eq!(
        dead.guest_cmdline(),
        vec![
            "vmrs.ip=10.96.0.2/30".to_string(),
            "vmrs.gw=10.96.0.1".to_string()
        ]
    );
    // "crash": the manager forgets everything; only the disk records and tags remain.
    // A device of `dead` whose record is lost is found by its tag alone.
    std::fs::remove_file(dead_dir.join(host::STATE_FILE)).expect("rm record");
    let deleted = host::reconcile(home.path(), &|vm| vm == "live")
        .await
        .expect("reconcile");
    // the dead VM's record is gone; its namespace is still known from `live`'s record, and
    // the tag on the TAP names the VM, so it is reaped while `live`'s devices stay
    let links = ns.links();
    assert!(!links.contains(&dead_tap), "deleted {deleted:?}, left {links:?}");
    assert!(links.contains(&tap_name("live", 0)));
    assert!(links.contains(&"vmrsbr2".to_string()));
    // now `live` is gone too
    let deleted = host::reconcile(home.path(), &|_| false).await.expect("reconcile");
    let links = ns.links();
    assert!(
        !links.iter().any(|l| l.starts_with("vmrs")),
        "deleted {deleted:?}, left {links:?}"
    );
    assert!(!nft_tables(&ns).contains("vmrs_"));
    assert!(NetState::load(&live_dir).expect("load").is_none());
    drop(live);
}

#[tokio::test]
async fn another_home_never_reaps_our_devices() {
    let ns = TestNetns::new("homes");
    let home = tempfile::tempdir().expect("home");
    let other = tempfile::tempdir().expect("other home");
    let dir = vm_dir(home.path(), "mine");
    let att = [bridge(&ns, "vmrsbr3", "10.94.0.1/24", false)];
    let st = host::prepare(home.path(), "mine", &dir, &att)
        .await
        .expect("prepare");
    // the other home learns of the namespace through a record of its own
    let odir = vm_dir(other.path(), "theirs");
    let ost = host::prepare(
        other.path(),
        "theirs",
        &odir,
        &[bridge(&ns, "vmrsbr4", "10.93.0.1/24", false)],
    )
    .await
    .expect("prepare other");
    host::reconcile(other.path(), &|vm| vm == "theirs")
        .await
        .expect("reconcile");
    let links = ns.links();
    assert!(links.contains(&tap_name("mine", 0)), "{links:?}");
    host::teardown(&st).await.expect("teardown");
    host::teardown(&ost).await.expect("teardown");
    assert!(!ns.links().iter().any(|l| l.starts_with("vmrs")));
}

/// `tap=lo` or `bridge=<a veth>` names a device that exists and is not what the attachment
/// needs: refused with the kind the kernel reports, before an address or a controller is set
/// on it, and nothing is left behind; a TAP the user made is used as is.
#[tokio::test]
async fn an_existing_device_of_the_wrong_kind_is_refused_untouched() {
    let ns = TestNetns::new("kind");
    let home = tempfile::tempdir().expect("home");
    ns.ip(&[
        "link", "add", "usrveth0", "type", "veth", "peer", "name", "usrveth1",
    ]);
    ns.ip(&["tuntap", "add", "dev", "usrtap0", "mode", "tap"]);
    let tap = |ifname: &str| NetworkAttachment::Tap {
        ifname: Some(ifname.into()),
        host_address: Some("10.97.0.1/30".parse().expect("cidr")),
        address: GuestAddress::Auto,
        dns: vec![],
        mac: None,
        netns: Some(ns.path()),
    };
    let addrs_before = ns.ip(&["-4", "addr", "show"]);
    for (i, (att, wanted, actual)) in [
        (tap("lo"), "tap", "loopback"),
        (tap("usrveth0"), "tap", "veth"),
        (bridge(&ns, "usrtap0", "10.98.0.1/24", true), "bridge", "tun"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("wrong{i}");
        let dir = vm_dir(home.path(), &name);
        let err = host::prepare(home.path(), &name, &dir, &[att])
            .await
            .expect_err("a device of the wrong kind must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains(wanted) && msg.contains(actual),
            "{wanted}/{actual}: {msg}"
        );
        assert_eq!(err.kind(), vm_rs::ErrorKind::Invalid, "{msg}");
    }
    assert_eq!(
        ns.ip(&["-4", "addr", "show"]),
        addrs_before,
        "an address was added"
    );
    assert!(!nft_tables(&ns).contains("vmrs_"));
    let links = ns.links();
    assert!(!links.iter().any(|l| l.starts_with("vmrs")), "{links:?}");
    // the user's own TAP is accepted, configured, and not deleted at teardown
    let dir = vm_dir(home.path(), "mine");
    let st = host::prepare(home.path(), "mine", &dir, &[tap("usrtap0")])
        .await
        .expect("a user-made tap is used");
    assert!(ns.ip(&["-4", "addr", "show", "usrtap0"]).contains("10.97.0.1/30"));
    host::teardown(&st).await.expect("teardown");
    assert!(ns.links().contains(&"usrtap0".to_string()));
}

#[tokio::test]
async fn nat_on_the_users_bridge_goes_with_the_last_vm_of_ours_and_the_bridge_stays() {
    // NAT asked for on a bridge the user made: vm-rs adds its table and must remove it once
    // none of its VMs is on that bridge (it used to stay for ever), while the bridge and the
    // user's own port on it stay.
    let ns = TestNetns::new("unat");
    ns.ip(&["link", "add", "usernat", "type", "bridge"]);
    ns.ip(&[
        "link", "add", "userport", "type", "veth", "peer", "name", "userpeer",
    ]);
    ns.ip(&["link", "set", "userport", "master", "usernat"]);
    let home = tempfile::tempdir().expect("home");
    let att = [bridge(&ns, "usernat", "10.93.0.1/24", true)];
    let a = host::prepare(home.path(), "a", &vm_dir(home.path(), "a"), &att)
        .await
        .expect("a");
    let b = host::prepare(home.path(), "b", &vm_dir(home.path(), "b"), &att)
        .await
        .expect("b");
    assert!(nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    assert!(a
        .devices
        .iter()
        .any(|d| matches!(d, host::HostDevice::Nat { bridge, .. } if bridge == "usernat")));
    host::teardown(&a).await.expect("teardown a");
    // b is still on the bridge: its NAT stays
    assert!(nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    host::teardown(&b).await.expect("teardown b");
    assert!(!nft_tables(&ns).contains("vmrs_"), "{}", nft_tables(&ns));
    let links = ns.links();
    assert!(
        links.contains(&"usernat".to_string()) && links.contains(&"userport".to_string()),
        "{links:?}"
    );
    assert!(ns.ip(&["link", "show", "userport"]).contains("master usernat"));
    host::teardown(&b).await.expect("teardown again");
}

/// The network the starter of [`a_starter_killed_at_any_moment_of_prepare_leaves_nothing_after_rm`]
/// sets up, in namespace `netns`.
fn kill_test_bridge(netns: PathBuf) -> NetworkAttachment {
    bridge_in(netns, "vmrskb0", "10.95.0.1/24", true)
}

/// The child side of [`a_starter_killed_at_any_moment_of_prepare_leaves_nothing_after_rm`]:
/// set up and tear down a NAT bridge network in the namespace it is given, for ever, printing
/// its pid and then a line per cycle.
async fn prepare_forever(ns: &str, home: &Path) -> ! {
    let dir = vm_dir(home, "vm1");
    let att = [kill_test_bridge(PathBuf::from("/var/run/netns").join(ns))];
    println!("pid {}", std::process::id());
    loop {
        let st = host::prepare(home, "vm1", &dir, &att).await.expect("prepare");
        host::teardown(&st).await.expect("teardown");
        println!("cycle");
    }
}

#[tokio::test]
async fn a_starter_killed_at_any_moment_of_prepare_leaves_nothing_after_rm() {
    // A starter is SIGKILLed anywhere in setting up a NAT bridge network (chaos found a kill
    // between creating the bridge and tagging it: the untagged bridge then looked like the
    // user's and outlived every VM with its NAT table). Whatever the moment, tearing down from
    // net.json (what `rm -f` does) leaves the namespace as it was, and so does the next start
    // of the VM with nobody having cleaned up. The starter runs under strace, every netlink
    // send and every process it spawns (nft) slowed by 3 ms after the call, so that the windows
    // between a kernel change and the next step (a few µs unslowed) are hit at random kill
    // moments over a cycle.
    if let (Ok(ns), Ok(home)) = (
        std::env::var("VMRS_TEST_PREPARE_NS"),
        std::env::var("VMRS_TEST_PREPARE_HOME"),
    ) {
        prepare_forever(&ns, Path::new(&home)).await;
    }
    use std::io::BufRead;
    let ns = TestNetns::new("kill");
    let home = tempfile::tempdir().expect("home");
    let dir = home.path().join("vms").join("vm1");
    let clean = |what: &str| {
        let links: Vec<String> = ns.links().into_iter().filter(|l| l != "lo").collect();
        assert!(links.is_empty(), "{what}: links left: {links:?}");
        let t = nft_tables(&ns);
        assert!(!t.contains("vmrs_"), "{what}: nft tables left: {t}");
    };
    let rounds = 48u32;
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    eprintln!("seed {seed}");
    for round in 0..rounds {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut tracer = std::process::Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=sendto,sendmsg,execve",
                "-e",
                "inject=sendto,sendmsg,execve:delay_exit=3000",
            ])
            .arg(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "a_starter_killed_at_any_moment_of_prepare_leaves_nothing_after_rm",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VMRS_TEST_PREPARE_NS", &ns.name)
            .env("VMRS_TEST_PREPARE_HOME", home.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("strace (package strace) runs the starter");
        let mut out = std::io::BufReader::new(tracer.stdout.take().expect("stdout"));
        let mut next = |want: &str| -> String {
            let mut line = String::new();
            loop {
                line.clear();
                assert_ne!(
                    out.read_line(&mut line).expect("read"),
                    0,
                    "the starter ended early"
                );
                // (libtest's "test NAME ... " precedes the first line, unended)
                if let Some(i) = line.find(want) {
                    return line[i..].trim().to_string();
                }
            }
        };
        let pid: i32 = next("pid ")[4..].parse().expect("pid");
        assert!(pid > 0);
        // one whole cycle measured, then a kill at a random moment of the next ones
        next("cycle");
        let t = std::time::Instant::now();
        next("cycle");
        let cycle = t.elapsed();
        let delay = cycle.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64);
        std::thread::sleep(delay);
        // the starter itself (a tracer killed first would let it run on)
        // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill the starter");
        tracer.wait().expect("wait");
        let what = format!("round {round} ({delay:?} into a {cycle:?} cycle)");
        if round % 3 == 2 {
            // the next start of the VM, nobody having cleaned up after the kill, tears the
            // leftovers down first
            let att = [kill_test_bridge(ns.path())];
            let st = host::prepare(home.path(), "vm1", &dir, &att)
                .await
                .unwrap_or_else(|e| panic!("{what}: start after the kill: {e}"));
            host::teardown(&st).await.expect("teardown");
        } else {
            // rm -f: tear down from the record
            host::teardown_vm_dir(&dir)
                .await
                .unwrap_or_else(|e| panic!("{what}: teardown: {e}"));
        }
        clean(&what);
    }
}
