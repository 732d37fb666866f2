//! The macOS-only half of the VZ backend: a [`VzPlan`] turned into Virtualization.framework
//! objects ([`configuration`]) and the machine run by `vmrs-vz` ([`run`]).
//!
//! This is a mechanical mapping, one framework object per plan field (see [`super::plan`]);
//! every decision was made, and tested, in the plan. The bindings are `objc2-virtualization`:
//! the framework's methods are `unsafe` there because Objective-C cannot promise Rust's rules,
//! and each call below says why it holds.
//!
//! Threading: the machine is created on, and only ever touched from, the main dispatch queue,
//! which the main thread serves (`dispatch_main`). The control socket and the agent bridge run
//! on a tokio runtime on another thread and send closures to the main queue; the machine itself
//! never leaves the main thread (it lives in a thread-local there).
//!
//! Compiled for `aarch64-apple-darwin` and `x86_64-apple-darwin` in CI; never run yet.

use super::control::{self, Reply, Request, VzState};
use super::plan::{VzCaching, VzLimits, VzPlan, VzSync};
use block2::RcBlock;
use dispatch2::DispatchQueue;
use objc2::rc::Retained;
use objc2::AllocAnyThread;
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::*;
use std::cell::RefCell;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;

/// The framework's bounds on this Mac.
pub fn limits() -> VzLimits {
    // SAFETY: class properties without arguments; they only read the host's configuration.
    unsafe {
        VzLimits {
            min_memory_bytes: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory_bytes: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
            min_cpus: u32::try_from(VZVirtualMachineConfiguration::minimumAllowedCPUCount()).unwrap_or(1),
            max_cpus: u32::try_from(VZVirtualMachineConfiguration::maximumAllowedCPUCount())
                .unwrap_or(u32::MAX),
        }
    }
}

/// The framework's own words for an error.
fn describe(e: &NSError) -> String {
    e.localizedDescription().to_string()
}

fn file_url(path: &Path) -> Result<Retained<NSURL>, String> {
    let s = path
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))?;
    Ok(NSURL::fileURLWithPath(&NSString::from_str(s)))
}

fn caching(c: VzCaching) -> VZDiskImageCachingMode {
    match c {
        VzCaching::Automatic => VZDiskImageCachingMode::Automatic,
        VzCaching::Uncached => VZDiskImageCachingMode::Uncached,
        VzCaching::Cached => VZDiskImageCachingMode::Cached,
    }
}

fn sync(s: VzSync) -> VZDiskImageSynchronizationMode {
    match s {
        VzSync::Full => VZDiskImageSynchronizationMode::Full,
        VzSync::Fsync => VZDiskImageSynchronizationMode::Fsync,
        VzSync::None => VZDiskImageSynchronizationMode::None,
    }
}

/// `plan` as a validated `VZVirtualMachineConfiguration`.
pub fn configuration(plan: &VzPlan) -> Result<Retained<VZVirtualMachineConfiguration>, String> {
    let kernel = file_url(&plan.boot.kernel)?;
    let initrd = plan.boot.initrd.as_deref().map(file_url).transpose()?;
    let log = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(&plan.console.log)
        .map_err(|e| format!("cannot open {}: {e}", plan.console.log.display()))?;
    let log_handle =
        NSFileHandle::initWithFileDescriptor_closeOnDealloc(NSFileHandle::alloc(), log.into_raw_fd(), true);
    let null = NSFileHandle::fileHandleWithNullDevice();

    // SAFETY: every object below is freshly allocated and initialised with its designated
    // initialiser, configured before the configuration is validated and used, and only from
    // this thread; the arguments are live Objective-C objects (URLs, strings, file handles)
    // or plain values, as the framework's headers require.
    unsafe {
        let config = VZVirtualMachineConfiguration::new();
        config.setCPUCount(plan.cpus as usize);
        config.setMemorySize(plan.memory_bytes);

        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        boot.setCommandLine(&NSString::from_str(&plan.boot.cmdline));
        boot.setInitialRamdiskURL(initrd.as_deref());
        config.setBootLoader(Some(&boot));

        // the guest console (hvc0) writes the VM's serial log; nothing is typed into it
        let attachment = VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
            VZFileHandleSerialPortAttachment::alloc(),
            Some(&null),
            Some(&log_handle),
        );
        let console = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        console.setAttachment(Some(&attachment));
        let ports: Vec<Retained<VZSerialPortConfiguration>> = vec![console.into_super()];
        config.setSerialPorts(&NSArray::from_retained_slice(&ports));

        let mut disks: Vec<Retained<VZStorageDeviceConfiguration>> = Vec::new();
        for d in &plan.disks {
            let url = file_url(&d.path)?;
            let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &url,
                d.read_only,
                caching(d.caching),
                sync(d.sync),
            )
            .map_err(|e| format!("disk {}: {}", d.id, describe(&e)))?;
            let blk = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &attachment,
            );
            if let Some(id) = &d.identifier {
                let id = NSString::from_str(id);
                VZVirtioBlockDeviceConfiguration::validateBlockDeviceIdentifier_error(&id)
                    .map_err(|e| format!("disk {} serial: {}", d.id, describe(&e)))?;
                blk.setBlockDeviceIdentifier(&id);
            }
            disks.push(blk.into_super());
        }
        config.setStorageDevices(&NSArray::from_retained_slice(&disks));

        let mut nics: Vec<Retained<VZNetworkDeviceConfiguration>> = Vec::new();
        for n in &plan.nics {
            let net = VZVirtioNetworkDeviceConfiguration::new();
            let nat = VZNATNetworkDeviceAttachment::new();
            net.setAttachment(Some(&nat));
            let mac =
                VZMACAddress::initWithString(VZMACAddress::alloc(), &NSString::from_str(&n.mac.to_string()))
                    .ok_or_else(|| format!("eth{}: VZMACAddress refuses {}", n.index, n.mac))?;
            net.setMACAddress(&mac);
            nics.push(net.into_super());
        }
        config.setNetworkDevices(&NSArray::from_retained_slice(&nics));

        let mut shares: Vec<Retained<VZDirectorySharingDeviceConfiguration>> = Vec::new();
        for s in &plan.shares {
            let tag = NSString::from_str(&s.tag);
            VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag)
                .map_err(|e| format!("share {}: {}", s.tag, describe(&e)))?;
            let url = file_url(&s.host_path)?;
            let dir = VZSharedDirectory::initWithURL_readOnly(VZSharedDirectory::alloc(), &url, s.read_only);
            let share = VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &dir);
            let fs = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &tag,
            );
            fs.setShare(Some(&share));
            shares.push(fs.into_super());
        }
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        if plan.vsock.is_some() {
            let sock: Vec<Retained<VZSocketDeviceConfiguration>> =
                vec![VZVirtioSocketDeviceConfiguration::new().into_super()];
            config.setSocketDevices(&NSArray::from_retained_slice(&sock));
        }
        if plan.entropy {
            let rng: Vec<Retained<VZEntropyDeviceConfiguration>> =
                vec![VZVirtioEntropyDeviceConfiguration::new().into_super()];
            config.setEntropyDevices(&NSArray::from_retained_slice(&rng));
        }

        config.validateWithError().map_err(|e| describe(&e))?;
        Ok(config)
    }
}

/// A value made on the main thread that only the main queue touches again (the NSURL of a
/// state to restore).
struct SendOnMain<T>(T);

// SAFETY: the wrapped value is created on the main thread before the I/O thread starts and is
// only dereferenced inside a closure run on the main queue (the main thread); the I/O thread
// merely carries it there.
unsafe impl<T> Send for SendOnMain<T> {}

/// Whether this macOS has `saveMachineStateToURL:` and `restoreMachineStateFromURL:` (14+).
fn supports_save_restore() -> bool {
    objc2::runtime::AnyClass::get(c"VZVirtualMachine").is_some_and(|cls| {
        cls.instance_method(objc2::sel!(saveMachineStateToURL:completionHandler:))
            .is_some()
            && cls
                .instance_method(objc2::sel!(restoreMachineStateFromURL:completionHandler:))
                .is_some()
    })
}

thread_local! {
    /// The machine; only ever set and read on the main thread (the main queue's).
    static MACHINE: RefCell<Option<Retained<VZVirtualMachine>>> = const { RefCell::new(None) };
}

fn state_of(vm: &VZVirtualMachine) -> VzState {
    // SAFETY: reading the state property on the machine's own queue (the main queue).
    let s = unsafe { vm.state() };
    match s {
        VZVirtualMachineState::Running => VzState::Running,
        VZVirtualMachineState::Paused => VzState::Paused,
        VZVirtualMachineState::Error => VzState::Error,
        VZVirtualMachineState::Starting => VzState::Starting,
        VZVirtualMachineState::Pausing => VzState::Pausing,
        VZVirtualMachineState::Resuming => VzState::Resuming,
        VZVirtualMachineState::Stopping => VzState::Stopping,
        VZVirtualMachineState::Saving => VzState::Saving,
        VZVirtualMachineState::Restoring => VzState::Restoring,
        _ => VzState::Stopped,
    }
}

/// A completion handler that sends its outcome once.
fn completion(reply: tokio::sync::oneshot::Sender<Reply>) -> RcBlock<dyn Fn(*mut NSError)> {
    let reply = std::sync::Mutex::new(Some(reply));
    RcBlock::new(move |err: *mut NSError| {
        // SAFETY: the framework passes nil or a valid NSError that lives for the call.
        let r = match unsafe { err.as_ref() } {
            None => Reply::Ok,
            Some(e) => Reply::Error { message: describe(e) },
        };
        if let Some(tx) = reply.lock().ok().and_then(|mut g| g.take()) {
            let _ = tx.send(r);
        }
    })
}

/// Carry out `request` on the main queue; the answer arrives on the returned channel.
fn on_main(request: Request) -> tokio::sync::oneshot::Receiver<Reply> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    DispatchQueue::main().exec_async(move || {
        MACHINE.with(|m| {
            let m = m.borrow();
            let Some(vm) = m.as_deref() else {
                let _ = tx.send(Reply::Error {
                    message: "no machine".into(),
                });
                return;
            };
            // SAFETY: every call is made on the machine's queue (this is the main queue),
            // with a completion block that outlives the call (the framework copies it).
            unsafe {
                match request {
                    Request::Status => {
                        let _ = tx.send(Reply::State { state: state_of(vm) });
                    }
                    Request::Pause => vm.pauseWithCompletionHandler(&completion(tx)),
                    Request::Resume => vm.resumeWithCompletionHandler(&completion(tx)),
                    Request::Stop => vm.stopWithCompletionHandler(&completion(tx)),
                    Request::RequestStop => {
                        let _ = tx.send(match vm.requestStopWithError() {
                            Ok(()) => Reply::Ok,
                            Err(e) => Reply::Error {
                                message: describe(&e),
                            },
                        });
                    }
                    Request::Save { .. } if !supports_save_restore() => {
                        let _ = tx.send(Reply::Error {
                            message: "saving a machine state needs macOS 14 or later".into(),
                        });
                    }
                    Request::Save { path } => match file_url(&path) {
                        Ok(url) => vm.saveMachineStateToURL_completionHandler(&url, &completion(tx)),
                        Err(message) => {
                            let _ = tx.send(Reply::Error { message });
                        }
                    },
                    #[allow(unreachable_patterns)]
                    _ => {
                        let _ = tx.send(Reply::Error {
                            message: "unknown request".into(),
                        });
                    }
                }
            }
        });
    });
    rx
}

/// Open a vsock connection to `port` of the guest; the descriptor is a duplicate the caller
/// owns (the connection object closes its own when released).
fn connect_vsock(port: u32) -> tokio::sync::oneshot::Receiver<Result<OwnedFd, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    DispatchQueue::main().exec_async(move || {
        MACHINE.with(|m| {
            let m = m.borrow();
            let Some(vm) = m.as_deref() else {
                let _ = tx.send(Err("no machine".into()));
                return;
            };
            let tx = std::sync::Mutex::new(Some(tx));
            let block = RcBlock::new(move |conn: *mut VZVirtioSocketConnection, err: *mut NSError| {
                // SAFETY: the framework passes nil or valid objects that live for the call;
                // the descriptor is duplicated before the connection can be released.
                let r = unsafe {
                    match (conn.as_ref(), err.as_ref()) {
                        (Some(c), None) => {
                            let fd = libc::dup(c.fileDescriptor());
                            if fd < 0 {
                                Err(std::io::Error::last_os_error().to_string())
                            } else {
                                Ok(OwnedFd::from_raw_fd(fd))
                            }
                        }
                        (_, Some(e)) => Err(describe(e)),
                        (None, None) => Err("no connection".into()),
                    }
                };
                if let Some(tx) = tx.lock().ok().and_then(|mut g| g.take()) {
                    let _ = tx.send(r);
                }
            });
            // SAFETY: on the machine's queue; the socket device exists because the plan has a
            // vsock (checked by the caller) and the block is copied by the framework.
            unsafe {
                let dev = vm.socketDevices().firstObject();
                if let Some(Ok(dev)) = dev.map(Retained::downcast::<VZVirtioSocketDevice>) {
                    dev.connectToPort_completionHandler(port, &block);
                }
                // else the block, and the sender in it, is dropped: the caller sees the
                // channel closed and drops the host connection
                drop(block);
            }
        });
    });
    rx
}

/// Serve the control socket: one request line, one reply line per connection.
async fn serve_control(socket: &Path) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = Vec::new();
            let mut r = tokio::io::BufReader::new(r.take(control::MAX_REPLY as u64));
            if r.read_until(b'\n', &mut line).await.is_err() {
                return;
            }
            let reply = match control::decode_request(line.trim_ascii()) {
                Ok(req) => {
                    let stop = matches!(req, Request::Stop);
                    let reply = on_main(req).await.unwrap_or(Reply::Error {
                        message: "the machine went away".into(),
                    });
                    if stop && reply == Reply::Ok {
                        let _ = w.write_all(&control::encode_reply(&reply)).await;
                        std::process::exit(0);
                    }
                    reply
                }
                Err(message) => Reply::Error { message },
            };
            let _ = w.write_all(&control::encode_reply(&reply)).await;
        });
    }
}

/// Bridge each connection to the agent socket to a new vsock connection to the guest.
async fn serve_agent(socket: &Path, port: u32) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    loop {
        let (mut host, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(Ok(fd)) = connect_vsock(port).await else {
                return;
            };
            // a vsock descriptor is a stream socket: tokio's Unix stream reads and writes it
            let std_stream = std::os::unix::net::UnixStream::from(fd);
            if std_stream.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(mut guest) = tokio::net::UnixStream::from_std(std_stream) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        });
    }
}

/// Run the machine of `plan`, serving `control_socket`, until it stops; with `restore`, the
/// machine state saved there is restored and resumed instead of booting. Never returns: the
/// process exits with 0 when the guest stopped, 1 on an error.
pub fn run(plan: VzPlan, control_socket: &Path, restore: Option<&Path>) -> ! {
    // SAFETY: a class property without arguments.
    if !unsafe { VZVirtualMachine::isSupported() } {
        eprintln!("vmrs-vz: Virtualization.framework is not supported on this Mac");
        std::process::exit(1);
    }
    let config = match configuration(&plan) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmrs-vz: invalid configuration: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: a validated configuration; the machine is created on the main thread, whose
    // queue (the main queue) it then uses for every call and callback.
    let vm = unsafe { VZVirtualMachine::initWithConfiguration(VZVirtualMachine::alloc(), &config) };
    MACHINE.with(|m| *m.borrow_mut() = Some(vm));

    let restore_url = match restore.map(file_url).transpose() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("vmrs-vz: {e}");
            std::process::exit(1);
        }
    };
    if restore_url.is_some() && !supports_save_restore() {
        eprintln!("vmrs-vz: restoring a machine state needs macOS 14 or later");
        std::process::exit(1);
    }
    // the URL is only used on the main queue, by the start step below
    let restore_url = SendOnMain(restore_url);
    let control = control_socket.to_path_buf();
    let agent = plan.vsock.clone();
    let name = plan.name.clone();
    let spawned = std::thread::Builder::new()
        .name("vmrs-vz-io".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vmrs-vz: cannot start runtime: {e}");
                    std::process::exit(1);
                }
            };
            rt.block_on(async move {
                // start, then watch for the machine to end (the delegate's job, done by asking)
                let (tx, rx) = tokio::sync::oneshot::channel();
                let restoring = restore_url.0.is_some();
                DispatchQueue::main().exec_async(move || {
                    let url = restore_url;
                    MACHINE.with(|m| {
                        if let Some(vm) = m.borrow().as_deref() {
                            // SAFETY: on the machine's queue; the block is copied by the
                            // framework; the URL is a live NSURL.
                            unsafe {
                                match url.0.as_deref() {
                                    Some(url) => {
                                        vm.restoreMachineStateFromURL_completionHandler(url, &completion(tx))
                                    }
                                    None => vm.startWithCompletionHandler(&completion(tx)),
                                }
                            }
                        }
                    });
                });
                let mut started = rx.await;
                if restoring && started == Ok(Reply::Ok) {
                    // a restored machine is paused: run it
                    started = on_main(Request::Resume).await;
                }
                match started {
                    Ok(Reply::Ok) => eprintln!("vmrs-vz: {name} started"),
                    Ok(Reply::Error { message }) => {
                        eprintln!("vmrs-vz: cannot start {name}: {message}");
                        std::process::exit(1);
                    }
                    _ => std::process::exit(1),
                }
                if let Some(v) = agent {
                    let port = v.guest_port;
                    tokio::spawn(async move {
                        if let Err(e) = serve_agent(&v.host_socket, port).await {
                            eprintln!("vmrs-vz: agent socket: {e}");
                        }
                    });
                }
                tokio::spawn(async move {
                    if let Err(e) = serve_control(&control).await {
                        eprintln!("vmrs-vz: control socket: {e}");
                        std::process::exit(1);
                    }
                });
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    match on_main(Request::Status).await {
                        Ok(Reply::State {
                            state: VzState::Stopped,
                        }) => {
                            eprintln!("vmrs-vz: {name} stopped");
                            std::process::exit(0);
                        }
                        Ok(Reply::State {
                            state: VzState::Error,
                        }) => {
                            eprintln!("vmrs-vz: {name} stopped with an error");
                            std::process::exit(1);
                        }
                        _ => {}
                    }
                }
            })
        });
    if let Err(e) = spawned {
        eprintln!("vmrs-vz: cannot start the i/o thread: {e}");
        std::process::exit(1);
    }
    dispatch2::dispatch_main()
}
