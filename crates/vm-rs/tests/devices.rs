//! One device model for every backend: every config feature is either rendered by a backend
//! (checked in its argv / API body) or refused before any host side effect — no VM directory,
//! no TAP or bridge, no nftables table, no process afterwards.

mod support;

use std::path::{Path, PathBuf};
use support::netns::TestNetns;
use vm_rs::config::{
    Accel, BackendKind, CacheMode, DiskConfig, DiskFormat, GuestAddress, NetworkAttachment, SharedDir,
};
use vm_rs::devices::DeviceSet;
use vm_rs::driver::cloud_hypervisor::{vm_config_body, CloudHypervisorDriver};
use vm_rs::driver::qemu::{args, QemuDriver};
use vm_rs::driver::{DriverError, VmDriver};
use vm_rs::manager::{plan_devices, ManagerError, StartOptions};
use vm_rs::{VmConfig, VmManager};

struct Fixture {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    disk: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("vmrs-dev")
        .tempdir_in("/tmp")
        .expect("tmp");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel, never booted").expect("kernel");
    let disk = dir.path().join("d,1.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    Fixture { dir, kernel, disk }
}

fn bridge(netns: Option<PathBuf>) -> NetworkAttachment {
    NetworkAttachment::Bridge {
        bridge: "vmrsbrT".into(),
        gateway: "10.97.0.1/24".parse().expect("cidr"),
        nat: true,
        address: GuestAddress::Auto,
        dns: vec![],
        port_forwards: vec![],
        mac: None,
        netns,
    }
}

/// A user-mode NIC on the VMM's own stack (which Cloud Hypervisor lacks).
fn vmm_user() -> NetworkAttachment {
    NetworkAttachment::User {
        port_forwards: vec![],
        mac: None,
        address: GuestAddress::Auto,
        via: vm_rs::config::UserNat::Vmm,
    }
}

/// A feature of a config, with how to turn it on and what its rendering must contain.
struct Feature {
    name: &'static str,
    apply: fn(&mut VmConfig, &mut StartOptions, &Fixture),
    /// Text the QEMU argv must contain when QEMU renders it.
    qemu: &'static str,
    /// Text the Cloud Hypervisor `vm.create` body must contain when it renders it.
    ch: &'static str,
}

fn features() -> Vec<Feature> {
    vec![
        Feature {
            name: "raw disk",
            apply: |c, _, f| c.disks.push(DiskConfig::new(&f.disk)),
            qemu: "virtio-blk-device,drive=disk0",
            ch: "\"image_type\":\"Raw\"",
        },
        Feature {
            name: "qcow2 read-only disk",
            apply: |c, _, f| {
                c.disks.push(DiskConfig {
                    format: DiskFormat::Qcow2,
                    read_only: true,
                    ..DiskConfig::new(&f.disk)
                })
            },
            qemu: "\"driver\":\"qcow2\"",
            ch: "\"readonly\":true",
        },
        Feature {
            name: "cache=none disk",
            apply: |c, _, f| {
                c.disks.push(DiskConfig {
                    cache: CacheMode::None,
                    ..DiskConfig::new(&f.disk)
                })
            },
            qemu: "\"direct\":true",
            ch: "\"direct\":true",
        },
        Feature {
            name: "cache=unsafe disk",
            apply: |c, _, f| {
                c.disks.push(DiskConfig {
                    cache: CacheMode::Unsafe,
                    ..DiskConfig::new(&f.disk)
                })
            },
            qemu: "\"no-flush\":true",
            ch: "",
        },
        Feature {
            name: "image root disk",
            apply: |_, o, f| o.rootfs = Some(f.disk.clone()),
            qemu: "serial=vmrs-root",
            ch: "\"serial\":\"vmrs-root\"",
        },
        Feature {
            name: "user network with a published port",
            apply: |c, _, _| {
                c.networks
                    .push(NetworkAttachment::user(vec![vm_rs::config::PortForward::tcp(
                        18080, 80,
                    )]))
            },
            qemu: "hostfwd=tcp:127.0.0.1:18080-10.0.2.15:80",
            // Cloud Hypervisor has no user-mode network: slirp4netns serves its TAP
            ch: "\"tap\":\"vmrs",
        },
        Feature {
            name: "user network on the vmm's own stack",
            apply: |c, _, _| c.networks.push(vmm_user()),
            qemu: "user,id=net0,net=10.0.2.0/24",
            ch: "",
        },
        Feature {
            name: "user network through slirp4netns",
            apply: |c, _, _| {
                c.networks.push(NetworkAttachment::User {
                    port_forwards: vec![],
                    mac: None,
                    address: GuestAddress::Auto,
                    via: vm_rs::config::UserNat::Slirp4netns,
                })
            },
            qemu: "tap,id=net0,ifname=vmrs",
            ch: "\"tap\":\"vmrs",
        },
        Feature {
            name: "bridge network",
            apply: |c, _, _| c.networks.push(bridge(None)),
            qemu: "tap,id=net0,ifname=vmrs",
            ch: "\"tap\":\"vmrs",
        },
        Feature {
            name: "switch network",
            apply: |c, _, _| c.networks.push(NetworkAttachment::switch("lab")),
            qemu: "dgram,id=net0",
            ch: "",
        },
        Feature {
            name: "shared directory",
            apply: |c, _, f| c.shared_dirs.push(SharedDir::new(f.dir.path(), "/data", "share")),
            qemu: "vhost-user-fs-device,chardev=vmrs-fs0,queue-size=1024,tag=share",
            ch: "\"fs\":[{",
        },
        Feature {
            name: "tcg acceleration",
            apply: |c, _, _| c.accel = Accel::Tcg,
            qemu: "-accel tcg",
            ch: "",
        },
        Feature {
            name: "guest agent required",
            apply: |_, o, _| o.require_agent = true,
            qemu: "virtserialport,bus=vmrs-vser0.0",
            // Cloud Hypervisor's own vsock device (hybrid vsock on the VM's agent socket)
            ch: "\"vsock\":{\"cid\":3,",
        },
    ]
}

fn base_config(f: &Fixture, backend: BackendKind) -> VmConfig {
    VmConfig::builder("feat")
        .kernel(&f.kernel)
        .backend(backend)
        .build_unchecked()
}

fn render_qemu(cfg: &VmConfig, dir: &Path, devices: &DeviceSet) -> String {
    let paths = args::QemuPaths::in_dir(dir, dir.join("serial.log"));
    let accel = if cfg.accel == Accel::Kvm {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let input = args::QemuArgsInput {
        config: cfg,
        accel,
        paths: &paths,
        devices,
        guest_params: &[],
        tsc_khz: Some(1),
    };
    args::build(&input)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every feature on every backend: rendered (the text its backend uses appears) or refused with
/// `Unsupported` naming a feature. A `""` expectation means the backend must refuse it.
#[test]
fn every_feature_is_rendered_or_refused() {
    let f = fixture();
    let home = f.dir.path().join("home");
    let vm_dir = home.join("vms").join("feat");
    let drivers: Vec<(Box<dyn VmDriver>, BackendKind)> = vec![
        (Box::new(QemuDriver::new()), BackendKind::Qemu),
        (
            Box::new(CloudHypervisorDriver::new()),
            BackendKind::CloudHypervisor,
        ),
    ];
    for feat in features() {
        for (driver, backend) in &drivers {
            let mut cfg = base_config(&f, *backend);
            let mut opts = StartOptions::default();
            (feat.apply)(&mut cfg, &mut opts, &f);
            let expect = match backend {
                BackendKind::Qemu => feat.qemu,
                _ => feat.ch,
            };
            let planned = plan_devices(&cfg, &vm_dir, &home, &opts, driver.as_ref());
            match (planned, expect) {
                (Ok(devices), "") => panic!(
                    "{backend} accepted {} but renders nothing: {devices:?}",
                    feat.name
                ),
                (Ok(devices), want) => {
                    let rendered = match backend {
                        BackendKind::Qemu => render_qemu(&cfg, &vm_dir, &devices),
                        _ => vm_config_body(&cfg, &devices, &f.kernel, &[])
                            .unwrap_or_else(|e| panic!("{backend} {}: {e}", feat.name))
                            .to_string(),
                    };
                    assert!(
                        rendered.contains(want),
                        "{backend} {}: {want:?} not in {rendered}",
                        feat.name
                    );
                }
                (
                    Err(ManagerError::Driver {
                        source: DriverError::Unsupported { backend: b, feature },
                        ..
                    }),
                    "",
                ) => {
                    assert_eq!(b, *backend);
                    assert!(!feature.is_empty());
                }
                (Err(e), want) => panic!("{backend} refused {} (expected {want:?}): {e:?}", feat.name),
            }
        }
    }
}

/// The QEMU backend gives every VM an entropy device and the agent port; Cloud Hypervisor an
/// entropy device and no agent (it has no transport yet), and says KVM honestly.
#[test]
fn defaults_per_backend() {
    let f = fixture();
    let home = f.dir.path().join("home");
    let dir = home.join("vms/feat");
    let opts = StartOptions::default();
    let q = plan_devices(
        &base_config(&f, BackendKind::Qemu),
        &dir,
        &home,
        &opts,
        &QemuDriver::new(),
    )
    .expect("qemu");
    assert!(q.entropy && q.agent.is_some());
    let argv = render_qemu(&base_config(&f, BackendKind::Qemu), &dir, &q);
    assert!(argv.contains("virtio-rng-device"), "{argv}");
    let cfg = base_config(&f, BackendKind::CloudHypervisor);
    let c = plan_devices(&cfg, &dir, &home, &opts, &CloudHypervisorDriver::new()).expect("ch");
    assert!(c.entropy && c.agent.is_none());
    let body = vm_config_body(&cfg, &c, &f.kernel, &[]).expect("body");
    assert_eq!(body["rng"]["src"], "/dev/urandom");
}

fn vms_in(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("vms"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Through the manager: a config the backend cannot run fails with `Unsupported` and leaves
/// no VM directory, no TAP or bridge (a bridge in a test namespace comes first in the config,
/// the refused switch network second), no nftables table and no VMM process.
#[tokio::test]
async fn refused_configs_leave_nothing_behind() {
    let f = fixture();
    // Any executable will do: the VMM is never launched for a refused config.
    std::env::set_var("VMRS_CLOUD_HYPERVISOR", "/bin/true");
    let home = f.dir.path().join("home");
    let mgr = VmManager::with_home(&home).await.expect("manager");
    let ns = TestNetns::new("devref");
    let before = ns.links();

    let mut cases: Vec<(VmConfig, StartOptions)> = Vec::new();
    let mut c = base_config(&f, BackendKind::CloudHypervisor);
    c.networks = vec![bridge(Some(ns.path())), NetworkAttachment::switch("lab")];
    cases.push((c, StartOptions::default()));
    let mut c = base_config(&f, BackendKind::CloudHypervisor);
    c.networks = vec![vmm_user()];
    cases.push((c, StartOptions::default()));
    let mut c = base_config(&f, BackendKind::CloudHypervisor);
    c.accel = Accel::Tcg;
    cases.push((c, StartOptions::default()));
    // an image VM asking for the virtio-serial agent: Cloud Hypervisor has only vsock
    let mut c = base_config(&f, BackendKind::CloudHypervisor);
    c.agent_transport = Some(vm_rs::devices::AgentTransport::VirtioSerial);
    cases.push((
        c,
        StartOptions {
            rootfs: Some(f.disk.clone()),
            require_agent: true,
            ..StartOptions::default()
        },
    ));
    for (cfg, opts) in cases {
        let what = format!("{:?} {:?} {opts:?}", cfg.backend, cfg.networks);
        match mgr.start_with(cfg, opts).await {
            Err(ManagerError::Driver {
                source: DriverError::Unsupported { feature, .. },
                ..
            }) => assert!(!feature.is_empty()),
            other => panic!("{what}: expected unsupported, got {other:?}"),
        }
        assert!(vms_in(&home).is_empty(), "{what}: {:?}", vms_in(&home));
        assert_eq!(ns.links(), before, "{what}: devices left in the namespace");
        let nft = ns.exec(&["nft", "list", "tables"]);
        assert!(
            !String::from_utf8_lossy(&nft.stdout).contains("vmrs"),
            "{what}: nftables table left"
        );
    }
    assert!(mgr.list().await.expect("list").is_empty());

    // A backend that cannot share refuses a share before its network, its directory or a
    // virtiofsd exists.
    let mgr = VmManager::builder()
        .home(&home)
        .driver(std::sync::Arc::new(NoShares(QemuDriver::new())))
        .build()
        .await
        .expect("manager");
    let mut c = base_config(&f, BackendKind::Qemu);
    c.networks = vec![bridge(Some(ns.path()))];
    let mut share = SharedDir::new(f.dir.path(), "/data", "t");
    share.read_only = true;
    c.shared_dirs.push(share);
    match mgr.start_with(c, StartOptions::default()).await {
        Err(ManagerError::Driver {
            source: DriverError::Unsupported { feature, .. },
            ..
        }) => assert!(feature.contains("virtio-fs"), "{feature}"),
        other => panic!("expected unsupported, got {other:?}"),
    }
    assert!(vms_in(&home).is_empty());
    assert_eq!(ns.links(), before, "devices left in the namespace");
    assert!(
        vm_rs::process::owned_by(&home.join("vms/feat")).is_empty(),
        "a virtiofsd was started"
    );
}

/// QEMU with its shared directories switched off: a backend that cannot share.
#[derive(Debug)]
struct NoShares(QemuDriver);

#[async_trait::async_trait]
impl VmDriver for NoShares {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn capabilities(&self) -> vm_rs::devices::Capabilities {
        vm_rs::devices::Capabilities {
            shared_dirs: false,
            ..self.0.capabilities()
        }
    }
    async fn boot(&self, spec: &vm_rs::driver::BootSpec<'_>) -> Result<vm_rs::driver::Launched, DriverError> {
        self.0.boot(spec).await
    }
    async fn status(&self, h: &vm_rs::VmHandle) -> Result<vm_rs::driver::VmmStatus, DriverError> {
        self.0.status(h).await
    }
    async fn pause(&self, h: &vm_rs::VmHandle) -> Result<(), DriverError> {
        self.0.pause(h).await
    }
    async fn resume(&self, h: &vm_rs::VmHandle) -> Result<(), DriverError> {
        self.0.resume(h).await
    }
    async fn request_shutdown(&self, h: &vm_rs::VmHandle) -> Result<(), DriverError> {
        self.0.request_shutdown(h).await
    }
    async fn quit(&self, h: &vm_rs::VmHandle) -> Result<(), DriverError> {
        self.0.quit(h).await
    }
}
