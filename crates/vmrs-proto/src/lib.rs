//! The vm-rs agent protocol: how the host talks to `vmrs-init` inside a guest over a
//! virtio-serial port.
//!
//! ## Transport
//!
//! QEMU exposes a `virtserialport` named [`PORT_NAME`] whose host end is a Unix socket
//! (`-chardev socket,server=on,wait=off`). The guest agent opens `/dev/vportNpM` whose
//! `/sys/class/virtio-ports/vportNpM/name` starts with [`PORT_NAME`]. A port is a byte stream
//! with one host connection at a time; requests are multiplexed over it by stream id.
//!
//! ## Framing
//!
//! ```text
//! +----------------+---------+------------------+----------------------+
//! | len: u32 BE    | type:u8 | stream: u32 BE   | payload (len-5 bytes)|
//! +----------------+---------+------------------+----------------------+
//! ```
//!
//! `len` counts type + stream + payload, so `5 <= len <= 5 + MAX_PAYLOAD`; a larger or smaller
//! length is a protocol error and the connection is dropped (a reader never allocates more
//! than [`MAX_FRAME`] bytes for one frame). Stream 0 is the connection itself (hello, ping,
//! shutdown); the host picks a fresh non-zero stream id for each exec or copy. Payload fields
//! are encoded in order: integers big-endian, byte strings as `u32 length + bytes`, lists as
//! `u32 count + items`, optional byte strings as `u8 present + bytes`. Trailing bytes in a
//! payload are an error.
//!
//! ## Conversation
//!
//! ```text
//! host                                         guest
//! Hello{version}                  ──►
//!                                 ◄──          HelloOk{version, agent}     (or Error)
//! Ping{nonce}                     ──►
//!                                 ◄──          Pong{nonce}
//! Exec{argv,env,cwd,user,flags}   ──► stream s
//!                                 ◄── s        Started{pid}                (or Error)
//! Stdin{data} ... Stdin{} (EOF)   ──► s
//! Signal{signo}                   ──► s
//!                                 ◄── s        Stdout{data} / Stderr{data} ...
//!                                 ◄── s        Exited{code} | Signaled{signo}
//! CopyIn{dest,name}               ──► s
//! Entry{..} Data{..}... End       ──► s
//!                                 ◄── s        CopyDone                    (or Error)
//! CopyOut{src}                    ──► s
//!                                 ◄── s        Entry{..} Data{..}... End   (or Error)
//! Shutdown                        ──►
//!                                 ◄──          ShutdownOk, then the guest powers off
//! ExecTty{exec,rows,cols}         ──► stream s                              (version 2)
//!                                 ◄── s        Started{pid} | SpawnFailed{errno,message}
//! Stdin{data}  (to the terminal)  ──► s
//! Resize{rows,cols}               ──► s
//!                                 ◄── s        Stdout{data} ... Exited | Signaled
//! ExecMain{exec,restart}          ──► stream s                              (version 2)
//!                                 ◄── s        Started{pid} | SpawnFailed | Error
//! SetIdentity{clock,entropy,..}   ──►                                      (version 2, after a restore)
//!                                 ◄──          IdentitySet                 (or Error)
//! SetAddresses{nics}              ──►                                      (version 4, after a restore)
//!                                 ◄──          AddressesSet                (or Error)
//! ```
//!
//! `SetIdentity` is what makes one snapshot's clones differ: the host's wall clock (a restored
//! guest's clock resumes at the snapshot's time), entropy mixed into and credited to the
//! kernel's pool followed by a reseed of its CRNG (`RNDADDENTROPY`, `RNDRESEEDCRNG`), and a new
//! host name and `/etc/machine-id`.
//!
//!
//! `ExecMain` starts the VM's main process (an image's entrypoint + cmd under `run -d`): it
//! outlives the connection like a detached exec, its output goes to the virtio-serial port
//! named [`LOG_PORT_NAME`] when the VM has one (else the console), it is restarted as
//! [`Restart`] says, and when it ends for good the guest prints [`MAIN_EXIT_MARKER`] followed
//! by `code=N` or `signal=N` on the console and powers off.
//!
//! ## Versions
//!
//! The host says hello with its newest version; a guest that speaks it answers `HelloOk` with
//! the same version, a newer guest answers with the host's version (it speaks every version
//! from [`MIN_VERSION`] to [`VERSION`]), and an older guest answers `Error`, after which the
//! host says hello again with an older version. What the conversation may use is the version
//! of the `HelloOk`:
//!
//! - 1: exec (pipes), signals, copy in and out, ping, shutdown.
//! - 2: adds [`Message::ExecTty`] (a process on a pseudo-terminal of the given size, its
//!   output on `Stdout`) with [`Message::Resize`], and [`Message::SpawnFailed`]: the reply to
//!   an exec whose program could not be started, with the `errno` (`ENOENT` = not found,
//!   `EACCES`/`ENOEXEC` = not executable) so the host can exit 127/126 like a shell. A version
//!   1 guest answers such an exec with a plain `Error`.
//! - 3: adds [`ExecRequest::root`]: the process runs with that guest directory as its root
//!   (chroot), its working directory and user resolved inside it — how one VM runs the
//!   containers of a pod, each on its own root filesystem. The flag [`EXEC_ROOT`] says the
//!   root follows the flags; an older guest refuses the request (trailing bytes).
//! - 4: adds [`Message::SetAddresses`]: a restored clone on a TAP, bridge or switch network
//!   takes a new MAC and IPv4 address per NIC ([`NicAddress`]) so clones of one snapshot are
//!   not twins on their network. An older guest answers it with `Error` (unknown type).
//!
//! A hello always starts a new conversation: the guest forgets the streams of the previous one
//! and kills its processes (a quick disconnect + reconnect is not always visible to the guest
//! otherwise). After a protocol error the guest answers with an `Error` on stream 0 and skips
//! input until the bytes of a hello frame (`00 00 00 07 01 00 00 00 00`); the host drops
//! frames that arrive before its `HelloOk`, and reconnects if a torn frame precedes it.
//!
//! A copy is a sequence of [`Entry`] records, each followed for regular files by `size` bytes
//! in [`Message::Data`] frames. The first entry has an empty path and is the copied root
//! itself; later paths are relative to it, `/`-separated, with no empty, `.` or `..`
//! components, and parents come before children. Receivers validate every path and never
//! follow symlinks while writing.
//!
//! Exec stdout/stderr frames carry at most [`CHUNK`] bytes. Flow control is the transport's:
//! a side that stops reading stalls the other's writes.

#![warn(missing_docs)]

use std::fmt;

/// Newest protocol version spoken by this crate (see the module docs for what each adds).
pub const VERSION: u16 = 4;
/// Oldest protocol version this crate still speaks.
pub const MIN_VERSION: u16 = 1;
/// First version with [`Message::ExecTty`], [`Message::Resize`] and [`Message::SpawnFailed`].
pub const VERSION_TTY: u16 = 2;
/// First version with [`ExecRequest::root`] ([`EXEC_ROOT`]).
pub const VERSION_ROOT: u16 = 3;
/// First version with [`Message::SetAddresses`].
pub const VERSION_ADDRESSES: u16 = 4;
/// Most NICs one [`Message::SetAddresses`] names.
pub const MAX_NICS: usize = 16;
/// Name (prefix) of the virtio-serial port carrying the protocol.
pub const PORT_NAME: &str = "vmrs.agent";
/// Guest vsock port on which the agent also listens (AF_VSOCK, any CID), carrying the same
/// frames as [`PORT_NAME`]; each connection is one conversation. Hosts behind the hybrid-vsock
/// convention (Cloud Hypervisor, Firecracker, vhost-device-vsock) reach it with
/// `CONNECT 1024\n`.
pub const VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port that receives the output of the main process
/// ([`Message::ExecMain`]); the host end is a file.
pub const LOG_PORT_NAME: &str = "vmrs.log";
/// Console line prefix with which the guest reports how its main process ended, followed by
/// `code=N` or `signal=N` (and ` restarts=N`).
pub const MAIN_EXIT_MARKER: &str = "vmrs-init: main process exited: ";
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes of the fixed header: length, type, stream.
pub const HEADER_LEN: usize = 9;
/// Largest whole frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
/// Preferred data chunk size for stdout/stderr/stdin/copy data.
pub const CHUNK: usize = 64 * 1024;
/// Longest path accepted in copy entries and exec fields.
pub const MAX_PATH: usize = 4096;

/// [`ExecRequest::flags`]: the host will send stdin (otherwise stdin is `/dev/null`).
pub const EXEC_STDIN: u8 = 1;
/// [`ExecRequest::flags`]: run detached; no output or exit status is reported, the process
/// outlives the connection; its output goes to the guest console.
pub const EXEC_DETACH: u8 = 2;
/// [`ExecRequest::flags`]: [`ExecRequest::root`] follows the flags (version 3). Set by the
/// encoder from `root`; a decoded request has it exactly when `root` is `Some`.
pub const EXEC_ROOT: u8 = 4;

/// Kind of a copied entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file; `size` bytes of data follow.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `target`.
    Symlink,
}

impl EntryKind {
    fn to_u8(self) -> u8 {
        match self {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
        }
    }
    fn from_u8(b: u8) -> Result<Self, ProtoError> {
        Ok(match b {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            _ => return Err(ProtoError::BadValue("entry kind")),
        })
    }
}

/// One file, directory or symlink in a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Size in bytes (files only; 0 otherwise).
    pub size: u64,
    /// Path relative to the copy root (empty for the root itself).
    pub path: Vec<u8>,
    /// Symlink target (symlinks only).
    pub target: Vec<u8>,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries laid over the defaults (`PATH`, `HOME`).
    pub env: Vec<Vec<u8>>,
    /// Working directory (default `/`).
    pub cwd: Option<Vec<u8>>,
    /// `user`, `uid`, `user:group` or `uid:gid` (default root).
    pub user: Option<Vec<u8>>,
    /// [`EXEC_STDIN`] | [`EXEC_DETACH`] ([`EXEC_ROOT`] is derived from `root`).
    pub flags: u8,
    /// Absolute guest directory the process runs chrooted in (version 3); `cwd` and `user`
    /// are resolved inside it.
    pub root: Option<Vec<u8>>,
}

/// When the guest restarts a main process ([`Message::ExecMain`]) that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Never: its end is the VM's end.
    #[default]
    No,
    /// When it exits with a code other than 0 or is killed by a signal.
    OnFailure,
    /// Whatever its exit.
    Always,
}

/// Restart rule of a main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restart {
    /// When.
    pub policy: RestartPolicy,
    /// At most this many restarts (then the next end is the VM's end).
    pub max: u32,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Longest entropy payload of [`Identity::entropy`].
pub const MAX_ENTROPY: usize = 4096;
/// Longest host name (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// A restored guest's new identity ([`Message::SetIdentity`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    /// Random bytes from the host for the kernel's pool (at most [`MAX_ENTROPY`]).
    pub entropy: Vec<u8>,
    /// New host name (at most [`MAX_HOSTNAME`] bytes).
    pub hostname: Option<Vec<u8>>,
    /// New `/etc/machine-id` (32 lower-case hex digits).
    pub machine_id: Option<Vec<u8>>,
}

/// One NIC's new addressing ([`Message::SetAddresses`]): interface `eth<index>` takes `mac`,
/// its IPv4 address (the one the guest init gave it) becomes `address`/`prefix_len`, and with
/// a `gateway` the default route goes through it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicAddress {
    /// Interface `eth<index>`.
    pub index: u8,
    /// New MAC (unicast).
    pub mac: [u8; 6],
    /// New IPv4 address.
    pub address: [u8; 4],
    /// Its prefix length (0..=32).
    pub prefix_len: u8,
    /// Default route through this address, if any.
    pub gateway: Option<[u8; 4]>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Host → guest: open the conversation.
    Hello {
        /// The host's protocol version.
        version: u16,
    },
    /// Guest → host: accepted.
    HelloOk {
        /// The guest's protocol version.
        version: u16,
        /// Agent name and version.
        agent: Vec<u8>,
    },
    /// Host → guest: liveness check.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Guest → host: reply to [`Message::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Host → guest: power off in an orderly way.
    Shutdown,
    /// Guest → host: shutdown begins.
    ShutdownOk,
    /// Host → guest: take a new identity (after a restore from a snapshot).
    SetIdentity(Identity),
    /// Guest → host: the identity was applied.
    IdentitySet,
    /// Host → guest: re-address these NICs (after a restore; version 4).
    SetAddresses(Vec<NicAddress>),
    /// Guest → host: every NIC of [`Message::SetAddresses`] has its new address.
    AddressesSet,
    /// Host → guest: start a process on this stream.
    Exec(ExecRequest),
    /// Guest → host: the process started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Host → guest: bytes for the process's stdin; empty = end of input.
    Stdin {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Host → guest: send a signal to the process.
    Signal {
        /// Signal number.
        signo: i32,
    },
    /// Guest → host: process stdout bytes.
    Stdout {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Guest → host: process stderr bytes.
    Stderr {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Guest → host: the process exited with a code (last message of the stream).
    Exited {
        /// Exit code.
        code: i32,
    },
    /// Guest → host: the process was killed by a signal (last message of the stream).
    Signaled {
        /// Signal number.
        signo: i32,
    },
    /// Host → guest: entries for `dest` follow on this stream.
    CopyIn {
        /// Destination path in the guest.
        dest: Vec<u8>,
        /// When `dest` is an existing directory, the root is created inside it with this name.
        name: Vec<u8>,
    },
    /// Host → guest: send the tree at `src` on this stream.
    CopyOut {
        /// Source path in the guest.
        src: Vec<u8>,
    },
    /// Either way: one copied entry.
    Entry(Entry),
    /// Either way: file data of the current entry.
    Data {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Either way: end of the copied tree.
    End,
    /// Guest → host: a [`Message::CopyIn`] completed.
    CopyDone,
    /// Host → guest (version 2): start a process on a new pseudo-terminal of size `size`; its
    /// stdin, stdout and stderr are the terminal, it leads a session of its own with the
    /// terminal as controlling tty. [`ExecRequest::flags`] other than [`EXEC_STDIN`] are ignored
    /// (terminal input is always accepted). Output arrives as [`Message::Stdout`].
    ExecTty {
        /// The command.
        exec: ExecRequest,
        /// Initial window size.
        size: WinSize,
    },
    /// Host → guest (version 2): the terminal of this stream's process changed size (the
    /// guest kernel tells the process with `SIGWINCH`).
    Resize {
        /// New size.
        size: WinSize,
    },
    /// Host → guest (version 2): start the VM's main process (see the module docs).
    /// [`ExecRequest::flags`] are ignored: stdin is `/dev/null`.
    ExecMain {
        /// The command.
        exec: ExecRequest,
        /// Whether and how often it is restarted.
        restart: Restart,
    },
    /// Guest → host (version 2): the program of an exec could not be started (last message
    /// of the stream).
    SpawnFailed {
        /// The `errno` of the failed start (`ENOENT`: not found; `EACCES`, `ENOEXEC`: not
        /// executable).
        errno: i32,
        /// What went wrong.
        message: Vec<u8>,
    },
    /// Guest → host: the request on this stream failed (last message of the stream).
    Error {
        /// What went wrong.
        message: Vec<u8>,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Declared frame length is above [`MAX_FRAME`] or below the header.
    BadLength(u64),
    /// Unknown message type byte.
    UnknownType(u8),
    /// The payload ended early.
    Truncated,
    /// The payload has bytes after the last field.
    TrailingBytes,
    /// A field exceeds its limit.
    TooLong(&'static str),
    /// A field has an invalid value.
    BadValue(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadLength(n) => write!(f, "invalid frame length {n}"),
            ProtoError::UnknownType(t) => write!(f, "unknown message type {t:#04x}"),
            ProtoError::Truncated => write!(f, "truncated payload"),
            ProtoError::TrailingBytes => write!(f, "trailing bytes after payload"),
            ProtoError::TooLong(what) => write!(f, "{what} too long"),
            ProtoError::BadValue(what) => write!(f, "invalid {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn list(&mut self, l: &[Vec<u8>]) {
        self.u32(l.len() as u32);
        for b in l {
            self.bytes(b);
        }
    }
    fn exec(&mut self, r: &ExecRequest) {
        self.list(&r.argv);
        self.list(&r.env);
        self.opt(&r.cwd);
        self.opt(&r.user);
        match &r.root {
            Some(root) => {
                self.u8(r.flags | EXEC_ROOT);
                self.bytes(root);
            }
            None => self.u8(r.flags & !EXEC_ROOT),
        }
    }
    fn opt(&mut self, o: &Option<Vec<u8>>) {
        match o {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, ProtoError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::TooLong(what));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn list(&mut self, max_items: usize, what: &'static str) -> Result<Vec<Vec<u8>>, ProtoError> {
        let n = self.u32()? as usize;
        if n > max_items {
            return Err(ProtoError::TooLong(what));
        }
        (0..n).map(|_| self.bytes(MAX_PAYLOAD, what)).collect()
    }
    fn exec(&mut self) -> Result<ExecRequest, ProtoError> {
        let argv = self.list(4096, "argv")?;
        let env = self.list(4096, "env")?;
        let cwd = self.opt(MAX_PATH, "cwd")?;
        let user = self.opt(256, "user")?;
        let flags = self.u8()?;
        let root = if flags & EXEC_ROOT != 0 {
            Some(self.bytes(MAX_PATH, "root")?)
        } else {
            None
        };
        Ok(ExecRequest {
            argv,
            env,
            cwd,
            user,
            flags,
            root,
        })
    }
    fn size(&mut self) -> Result<WinSize, ProtoError> {
        Ok(WinSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }
    fn opt(&mut self, max: usize, what: &'static str) -> Result<Option<Vec<u8>>, ProtoError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes(max, what)?)),
            _ => Err(ProtoError::BadValue(what)),
        }
    }
}

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0x01,
            Message::Ping { .. } => 0x02,
            Message::Shutdown => 0x03,
            Message::SetIdentity(_) => 0x40,
            Message::IdentitySet => 0xb0,
            Message::SetAddresses(_) => 0x41,
            Message::AddressesSet => 0xb1,
            Message::Exec(_) => 0x10,
            Message::Stdin { .. } => 0x11,
            Message::Signal { .. } => 0x12,
            Message::ExecTty { .. } => 0x13,
            Message::Resize { .. } => 0x14,
            Message::ExecMain { .. } => 0x15,
            Message::CopyIn { .. } => 0x20,
            Message::CopyOut { .. } => 0x21,
            Message::Entry(_) => 0x22,
            Message::Data { .. } => 0x23,
            Message::End => 0x24,
            Message::HelloOk { .. } => 0x81,
            Message::Pong { .. } => 0x82,
            Message::ShutdownOk => 0x83,
            Message::Started { .. } => 0x90,
            Message::Stdout { .. } => 0x91,
            Message::Stderr { .. } => 0x92,
            Message::Exited { .. } => 0x93,
            Message::Signaled { .. } => 0x94,
            Message::SpawnFailed { .. } => 0x95,
            Message::CopyDone => 0xa0,
            Message::Error { .. } => 0xe0,
        }
    }

    /// Encode as one frame on `stream`. Fails if the payload exceeds [`MAX_PAYLOAD`].
    pub fn encode(&self, stream: u32) -> Result<Vec<u8>, ProtoError> {
        let mut w = W(Vec::with_capacity(64));
        w.u32(0); // length, patched below
        w.u8(self.type_byte());
        w.u32(stream);
        match self {
            Message::Hello { version } => w.u16(*version),
            Message::HelloOk { version, agent } => {
                w.u16(*version);
                w.bytes(agent);
            }
            Message::Ping { nonce } | Message::Pong { nonce } => w.u64(*nonce),
            Message::Shutdown
            | Message::ShutdownOk
            | Message::End
            | Message::CopyDone
            | Message::IdentitySet
            | Message::AddressesSet => {}
            Message::SetAddresses(nics) => {
                if nics.len() > MAX_NICS {
                    return Err(ProtoError::TooLong("nics"));
                }
                w.u8(nics.len() as u8);
                for n in nics {
                    w.u8(n.index);
                    w.0.extend_from_slice(&n.mac);
                    w.0.extend_from_slice(&n.address);
                    w.u8(n.prefix_len);
                    match n.gateway {
                        Some(g) => {
                            w.u8(1);
                            w.0.extend_from_slice(&g);
                        }
                        None => w.u8(0),
                    }
                }
            }
            Message::SetIdentity(id) => {
                w.u64(id.realtime_ns);
                w.bytes(&id.entropy);
                w.opt(&id.hostname);
                w.opt(&id.machine_id);
            }
            Message::Exec(r) => w.exec(r),
            Message::ExecTty { exec, size } => {
                w.exec(exec);
                w.u16(size.rows);
                w.u16(size.cols);
            }
            Message::Resize { size } => {
                w.u16(size.rows);
                w.u16(size.cols);
            }
            Message::ExecMain { exec, restart } => {
                w.exec(exec);
                w.u8(match restart.policy {
                    RestartPolicy::No => 0,
                    RestartPolicy::OnFailure => 1,
                    RestartPolicy::Always => 2,
                });
                w.u32(restart.max);
            }
            Message::SpawnFailed { errno, message } => {
                w.i32(*errno);
                w.bytes(message);
            }
            Message::Started { pid } => w.u32(*pid),
            Message::Stdin { data }
            | Message::Stdout { data }
            | Message::Stderr { data }
            | Message::Data { data } => w.bytes(data),
            Message::Signal { signo } | Message::Signaled { signo } => w.i32(*signo),
            Message::Exited { code } => w.i32(*code),
            Message::CopyIn { dest, name } => {
                w.bytes(dest);
                w.bytes(name);
            }
            Message::CopyOut { src } => w.bytes(src),
            Message::Entry(e) => {
                w.u8(e.kind.to_u8());
                w.u32(e.mode);
                w.u64(e.size);
                w.bytes(&e.path);
                w.bytes(&e.target);
            }
            Message::Error { message } => w.bytes(message),
        }
        let mut buf = w.0;
        let len = buf.len() - 4;
        if len > MAX_FRAME - 4 {
            return Err(ProtoError::TooLong("frame"));
        }
        buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(buf)
    }

    /// Decode a message from its type byte and payload.
    pub fn decode(ty: u8, payload: &[u8]) -> Result<Message, ProtoError> {
        let mut r = R(payload);
        let m = match ty {
            0x01 => Message::Hello { version: r.u16()? },
            0x02 => Message::Ping { nonce: r.u64()? },
            0x03 => Message::Shutdown,
            0x10 => Message::Exec(r.exec()?),
            0x13 => Message::ExecTty {
                exec: r.exec()?,
                size: r.size()?,
            },
            0x14 => Message::Resize { size: r.size()? },
            0x15 => Message::ExecMain {
                exec: r.exec()?,
                restart: Restart {
                    policy: match r.u8()? {
                        0 => RestartPolicy::No,
                        1 => RestartPolicy::OnFailure,
                        2 => RestartPolicy::Always,
                        _ => return Err(ProtoError::BadValue("restart policy")),
                    },
                    max: r.u32()?,
                },
            },
            0x11 => Message::Stdin {
                data: r.bytes(MAX_PAYLOAD, "data")?,
            },
            0x12 => Message::Signal { signo: r.i32()? },
            0x20 => Message::CopyIn {
                dest: r.bytes(MAX_PATH, "path")?,
                name: r.bytes(MAX_PATH, "name")?,
            },
            0x21 => Message::CopyOut {
                src: r.bytes(MAX_PATH, "path")?,
            },
            0x22 => Message::Entry(Entry {
                kind: EntryKind::from_u8(r.u8()?)?,
                mode: r.u32()?,
                size: r.u64()?,
                path: r.bytes(MAX_PATH, "path")?,
                target: r.bytes(MAX_PATH, "link target")?,
            }),
            0x23 => Message::Data {
                data: r.bytes(MAX_PAYLOAD, "data")?,
            },
            0x24 => Message::End,
            0x81 => Message::HelloOk {
                version: r.u16()?,
                agent: r.bytes(256, "agent")?,
            },
            0x82 => Message::Pong { nonce: r.u64()? },
            0x83 => Message::ShutdownOk,
            0x90 => Message::Started { pid: r.u32()? },
            0x91 => Message::Stdout {
                data: r.bytes(MAX_PAYLOAD, "data")?,
            },
            0x92 => Message::Stderr {
                data: r.bytes(MAX_PAYLOAD, "data")?,
            },
            0x93 => Message::Exited { code: r.i32()? },
            0x94 => Message::Signaled { signo: r.i32()? },
            0x95 => Message::SpawnFailed {
                errno: r.i32()?,
                message: r.bytes(64 * 1024, "message")?,
            },
            0xa0 => Message::CopyDone,
            0x40 => Message::SetIdentity(Identity {
                realtime_ns: r.u64()?,
                entropy: r.bytes(MAX_ENTROPY, "entropy")?,
                hostname: r.opt(MAX_HOSTNAME, "hostname")?,
                machine_id: r.opt(32, "machine id")?,
            }),
            0xb0 => Message::IdentitySet,
            0x41 => {
                let n = usize::from(r.u8()?);
                if n > MAX_NICS {
                    return Err(ProtoError::TooLong("nics"));
                }
                let mut nics = Vec::with_capacity(n);
                for _ in 0..n {
                    let index = r.u8()?;
                    let mac: [u8; 6] = r.take(6)?.try_into().map_err(|_| ProtoError::BadValue("mac"))?;
                    let address: [u8; 4] = r
                        .take(4)?
                        .try_into()
                        .map_err(|_| ProtoError::BadValue("address"))?;
                    let prefix_len = r.u8()?;
                    if prefix_len > 32 {
                        return Err(ProtoError::BadValue("prefix length"));
                    }
                    let gateway = match r.u8()? {
                        0 => None,
                        1 => Some(
                            r.take(4)?
                                .try_into()
                                .map_err(|_| ProtoError::BadValue("gateway"))?,
                        ),
                        _ => return Err(ProtoError::BadValue("gateway")),
                    };
                    nics.push(NicAddress {
                        index,
                        mac,
                        address,
                        prefix_len,
                        gateway,
                    });
                }
                Message::SetAddresses(nics)
            }
            0xb1 => Message::AddressesSet,
            0xe0 => Message::Error {
                message: r.bytes(64 * 1024, "message")?,
            },
            other => return Err(ProtoError::UnknownType(other)),
        };
        if !r.0.is_empty() {
            return Err(ProtoError::TrailingBytes);
        }
        Ok(m)
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Stream id (0 = connection).
    pub stream: u32,
    /// The message.
    pub message: Message,
}

/// Incremental frame decoder: feed bytes as they arrive, take frames out.
///
/// After an error the decoder is poisoned (the stream is out of sync) and keeps returning it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    error: Option<ProtoError>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if !(HEADER_LEN - 4..=MAX_FRAME - 4).contains(&len) {
            let e = ProtoError::BadLength(len as u64);
            self.error = Some(e.clone());
            return Err(e);
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let ty = avail[4];
        let stream = u32::from_be_bytes([avail[5], avail[6], avail[7], avail[8]]);
        let result = Message::decode(ty, &avail[HEADER_LEN..4 + len]);
        self.start += 4 + len;
        if self.start > MAX_FRAME && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        match result {
            Ok(message) => Ok(Some(Frame { stream, message })),
            Err(e) => {
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// How a main process ended, from a console line carrying [`MAIN_EXIT_MARKER`]: the exit code,
/// or 128 + the signal (the shell's convention). `None` when the line is not such a report.
pub fn parse_main_exit(line: &str) -> Option<i32> {
    let rest = &line[line.find(MAIN_EXIT_MARKER)? + MAIN_EXIT_MARKER.len()..];
    let word = rest.split_whitespace().next()?;
    if let Some(c) = word.strip_prefix("code=") {
        return c.parse().ok();
    }
    let s: i32 = word.strip_prefix("signal=")?.parse().ok()?;
    (1..=64).contains(&s).then_some(128 + s)
}

/// Validate a relative copy path: `/`-separated components, none empty, `.` or `..`, no NUL.
/// The empty path (the copy root) is valid.
pub fn valid_relative_path(path: &[u8]) -> bool {
    if path.is_empty() {
        return true;
    }
    path.len() <= MAX_PATH
        && !path.contains(&0)
        && path
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { version: VERSION },
            Message::HelloOk {
                version: 1,
                agent: b"vmrs-init 0.2".to_vec(),
            },
            Message::Ping { nonce: 42 },
            Message::Pong { nonce: u64::MAX },
            Message::Shutdown,
            Message::ShutdownOk,
            Message::SetIdentity(Identity {
                realtime_ns: 1_800_000_000_123_456_789,
                entropy: vec![7; 64],
                hostname: Some(b"clone-1".to_vec()),
                machine_id: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            }),
            Message::SetIdentity(Identity::default()),
            Message::IdentitySet,
            Message::SetAddresses(vec![
                NicAddress {
                    index: 0,
                    mac: [2, 1, 2, 3, 4, 5],
                    address: [10, 88, 0, 7],
                    prefix_len: 24,
                    gateway: Some([10, 88, 0, 1]),
                },
                NicAddress {
                    index: 3,
                    mac: [6, 0, 0, 0, 0, 9],
                    address: [192, 168, 9, 200],
                    prefix_len: 32,
                    gateway: None,
                },
            ]),
            Message::SetAddresses(Vec::new()),
            Message::AddressesSet,
            Message::Exec(ExecRequest {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
                env: vec![b"A=1".to_vec()],
                cwd: Some(b"/tmp".to_vec()),
                user: None,
                flags: EXEC_STDIN,
                root: None,
            }),
            Message::Exec(ExecRequest {
                argv: vec![b"true".to_vec()],
                user: Some(b"1000".to_vec()),
                flags: EXEC_STDIN | EXEC_ROOT,
                root: Some(b"/run/vmrs-pod/c1".to_vec()),
                ..ExecRequest::default()
            }),
            Message::Started { pid: 7 },
            Message::Stdin { data: vec![] },
            Message::Signal { signo: 15 },
            Message::Stdout { data: b"x".to_vec() },
            Message::Stderr { data: b"y".to_vec() },
            Message::Exited { code: -1 },
            Message::Signaled { signo: 9 },
            Message::CopyIn {
                dest: b"/root".to_vec(),
                name: b"dir".to_vec(),
            },
            Message::CopyOut {
                src: b"/etc".to_vec(),
            },
            Message::Entry(Entry {
                kind: EntryKind::Symlink,
                mode: 0o777,
                size: 0,
                path: b"a/b".to_vec(),
                target: b"../c".to_vec(),
            }),
            Message::Data { data: vec![0; 100] },
            Message::End,
            Message::CopyDone,
            Message::Error {
                message: b"nope".to_vec(),
            },
            Message::ExecTty {
                exec: ExecRequest {
                    argv: vec![b"sh".to_vec()],
                    env: vec![b"TERM=xterm".to_vec()],
                    cwd: None,
                    user: Some(b"1000:1000".to_vec()),
                    flags: EXEC_STDIN,
                    root: None,
                },
                size: WinSize { rows: 24, cols: 80 },
            },
            Message::Resize {
                size: WinSize {
                    rows: u16::MAX,
                    cols: 0,
                },
            },
            Message::SpawnFailed {
                errno: 2,
                message: b"not found".to_vec(),
            },
            Message::ExecMain {
                exec: ExecRequest {
                    argv: vec![b"/entry".to_vec()],
                    ..ExecRequest::default()
                },
                restart: Restart {
                    policy: RestartPolicy::OnFailure,
                    max: 3,
                },
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_the_decoder() {
        let mut d = Decoder::new();
        let mut all = Vec::new();
        for (i, m) in samples().into_iter().enumerate() {
            all.extend(m.encode(i as u32).unwrap());
        }
        // Feed one byte at a time.
        let mut out = Vec::new();
        for b in all {
            d.push(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out.len(), samples().len());
        for (i, (f, m)) in out.iter().zip(samples()).enumerate() {
            assert_eq!(f.stream, i as u32);
            assert_eq!(f.message, m);
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_and_undersized_lengths_are_rejected_before_buffering() {
        let mut d = Decoder::new();
        d.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(matches!(d.next_frame(), Err(ProtoError::BadLength(_))));
        // Poisoned afterwards.
        d.push(&Message::End.encode(1).unwrap());
        assert!(d.next_frame().is_err());
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 2, 0x24, 0]);
        assert!(matches!(d.next_frame(), Err(ProtoError::BadLength(2))));
    }

    #[test]
    fn unknown_types_trailing_bytes_and_bad_fields_are_errors() {
        let mut f = Message::End.encode(1).unwrap();
        f[4] = 0x77;
        let mut d = Decoder::new();
        d.push(&f);
        assert_eq!(d.next_frame(), Err(ProtoError::UnknownType(0x77)));

        let mut f = Message::Ping { nonce: 1 }.encode(0).unwrap();
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_be_bytes());
        let mut d = Decoder::new();
        d.push(&f);
        assert_eq!(d.next_frame(), Err(ProtoError::TrailingBytes));

        // A byte string claiming more than the payload holds.
        assert_eq!(
            Message::decode(0x23, &[0, 0, 0, 9, 1]),
            Err(ProtoError::Truncated)
        );
        assert_eq!(
            Message::decode(0x22, &[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtoError::BadValue("entry kind"))
        );
        // addresses: too many NICs, a prefix past 32, a bad gateway flag, a cut-off NIC
        assert_eq!(Message::decode(0x41, &[17]), Err(ProtoError::TooLong("nics")));
        let nic = |prefix: u8, gw: u8| vec![1, 0, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2, prefix, gw];
        assert_eq!(
            Message::decode(0x41, &nic(33, 0)),
            Err(ProtoError::BadValue("prefix length"))
        );
        assert_eq!(
            Message::decode(0x41, &nic(24, 2)),
            Err(ProtoError::BadValue("gateway"))
        );
        assert_eq!(Message::decode(0x41, &nic(24, 1)), Err(ProtoError::Truncated));
        assert!(Message::decode(0x41, &nic(24, 0)).is_ok());
        let many = Message::SetAddresses(vec![
            NicAddress {
                index: 0,
                mac: [2; 6],
                address: [10, 0, 0, 2],
                prefix_len: 8,
                gateway: None,
            };
            MAX_NICS + 1
        ]);
        assert_eq!(many.encode(1), Err(ProtoError::TooLong("nics")));
    }

    #[test]
    fn oversized_messages_cannot_be_encoded() {
        let m = Message::Data {
            data: vec![0; MAX_PAYLOAD + 1],
        };
        assert!(m.encode(1).is_err());
        let m = Message::Data {
            data: vec![0; MAX_PAYLOAD - 4],
        };
        assert!(m.encode(1).is_ok());
    }

    #[test]
    fn main_exit_lines() {
        assert_eq!(
            parse_main_exit("vmrs-init: main process exited: code=3 restarts=0"),
            Some(3)
        );
        assert_eq!(
            parse_main_exit("[ 1.2] vmrs-init: main process exited: signal=9\r"),
            Some(137)
        );
        assert_eq!(
            parse_main_exit("vmrs-init: main process exited: signal=999"),
            None
        );
        assert_eq!(parse_main_exit("vmrs-init: main process exited: "), None);
        assert_eq!(parse_main_exit("code=3"), None);
    }

    #[test]
    fn relative_paths() {
        for ok in [&b""[..], b"a", b"a/b", b"a.b/..c"] {
            assert!(valid_relative_path(ok), "{ok:?}");
        }
        for bad in [&b"/a"[..], b"a/", b"../a", b"a/../b", b".", b"a//b", b"a\0b"] {
            assert!(!valid_relative_path(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = Decoder::new();
            for c in chunks {
                d.push(&c);
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }

        #[test]
        fn decode_payload_never_panics(ty in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Message::decode(ty, &payload);
        }

        #[test]
        fn data_round_trips(stream in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..4096), split in 0usize..4200) {
            let f = Message::Stdout { data: data.clone() }.encode(stream).unwrap();
            let split = split.min(f.len());
            let mut d = Decoder::new();
            d.push(&f[..split]);
            let first = d.next_frame().unwrap();
            d.push(&f[split..]);
            let frame = match first { Some(fr) => fr, None => d.next_frame().unwrap().unwrap() };
            prop_assert_eq!(frame, Frame { stream, message: Message::Stdout { data } });
        }
    }
}
