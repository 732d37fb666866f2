//! `vmrs` networking flags against real guests: published ports shown by `ps` and bound on the
//! host, switch networks listed by `vmrs network` and stopped with their last VM, bad specs
//! rejected with exit code 5.

mod support;
use std::time::Duration;
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn published_port_is_listed_and_bound() {
    let home = Home::new();
    let port = free_port();
    let spec = format!("{port}:80");
    home.vmrs()
        .args(["run", "-d", "--name", "web", "-p", &spec])
        .assert()
        .success();
    let rows = home.json(&["ps", "--json"]);
    let row = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "web"))
        .expect("web in ps");
    assert_eq!(row["ip"], "10.0.2.15");
    assert_eq!(row["ports"][0], format!("127.0.0.1:{port}->80/tcp"));
    let table = home.vmrs().args(["ps"]).output().expect("ps");
    assert!(String::from_utf8_lossy(&table.stdout).contains(&format!("127.0.0.1:{port}->80/tcp")));
    // QEMU listens on the published port
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    home.vmrs().args(["rm", "-f", "web"]).assert().success();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn switch_network_lives_with_its_vms() {
    let home = Home::new();
    home.vmrs()
        .args(["run", "-d", "--name", "s1", "--net", "switch=lab"])
        .assert()
        .success();
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets[0]["name"], "lab");
    assert_eq!(nets[0]["running"], true);
    assert_eq!(nets[0]["members"][0], "s1");
    let pid = nets[0]["switch_pid"].as_u64().expect("pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // the switch outlives the CLI process that started it: inspect reads its counters
    std::thread::sleep(Duration::from_millis(1500));
    let ports = home.json(&["network", "inspect", "lab"]);
    assert!(ports.is_array());
    home.vmrs().args(["rm", "-f", "s1"]).assert().success();
    let nets = home.json(&["network", "ls", "--json"]);
    assert_eq!(nets.as_array().map(Vec::len), Some(0), "{nets}");
    home.vmrs().args(["network", "inspect", "lab"]).assert().code(3);
}

#[test]
fn bad_network_specs_exit_with_code_5() {
    let home = Home::new();
    for args in [
        &["run", "-d", "--name", "x", "--net", "bogus"][..],
        &["run", "-d", "--name", "x", "-p", "99999:80"][..],
        &["run", "-d", "--name", "x", "--net", "none", "-p", "8080:80"][..],
        &["run", "-d", "--name", "x", "--net", "bridge=br0"][..],
    ] {
        home.vmrs().args(args).assert().code(5);
    }
    assert!(home
        .json(&["ps", "-a", "--json"])
        .as_array()
        .is_some_and(Vec::is_empty));
}
