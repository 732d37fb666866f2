//! A tiny PVH guest for booting tests: an x86-64 ELF with a `Xen` PVH entry note whose code,
//! entered in 32-bit protected mode, writes a message to the COM1 data port (0x3f8) and then
//! idles in a `hlt` loop — or, built with [`Ending::PowerOff`], first writes the ACPI S5 sleep
//! value (0x34) to Cloud Hypervisor's ACPI shutdown port (0x600), powering itself off.
//!
//! Cloud Hypervisor direct-boots such an ELF, so tests get a guest that reports
//! `VMRS_READY <ip>` on the serial console within milliseconds, without a Linux kernel (which
//! cannot boot on hosts whose KVM is a software implementation).
//!
//! Layout (one `PT_LOAD` covering the whole file at physical [`LOAD_ADDR`]):
//!
//! ```text
//! 0x000  ELF header (64 bytes)
//! 0x040  PT_LOAD, PT_NOTE program headers (2 x 56 bytes)
//! 0x0b0  note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry
//! 0x100  code
//! 0x120  message
//! ```

use std::path::{Path, PathBuf};

/// Guest physical address the image is loaded at (1 MiB, where kernels live).
pub const LOAD_ADDR: u64 = 0x10_0000;
const CODE_OFF: usize = 0x100;
const MSG_OFF: usize = 0x120;
/// Longest message the image holds.
pub const MAX_MESSAGE: usize = 0x100;

/// The default message: what the guest init prints when it is ready.
pub const READY_LINE: &[u8] = b"VMRS_READY 10.0.0.2\n";

/// What the guest does after printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Idle forever.
    Idle,
    /// Power off through the ACPI shutdown port.
    PowerOff,
    /// Reset through the i8042 keyboard controller (what ends a Firecracker guest, which has
    /// no ACPI shutdown port).
    Reset,
}

/// The power-off instructions (`mov dx, 0x600; mov al, 0x34; out dx, al`), also what the
/// protocol peer looks for to emulate this guest.
pub const POWER_OFF_CODE: [u8; 7] = [0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee];

/// The i8042 reset instructions (`mov al, 0xfe; out 0x64, al`), also what the Firecracker
/// protocol peer looks for to emulate this guest.
pub const RESET_CODE: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];

/// Build the ELF image printing `message` (at most [`MAX_MESSAGE`] bytes, no NUL), then idling.
pub fn elf(message: &[u8]) -> Vec<u8> {
    elf_with(message, Ending::Idle)
}

/// Build the ELF image printing `message`, then ending as `ending` says.
pub fn elf_with(message: &[u8], ending: Ending) -> Vec<u8> {
    assert!(
        message.len() <= MAX_MESSAGE && !message.contains(&0),
        "bad message"
    );
    let entry = LOAD_ADDR + CODE_OFF as u64;
    let msg_addr = (LOAD_ADDR + MSG_OFF as u64) as u32;
    let mut img = vec![0u8; MSG_OFF + message.len() + 1];

    // ELF header
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2; // ELFCLASS64
    img[5] = 1; // little-endian
    img[6] = 1; // EV_CURRENT
    img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    img[20..24].copy_from_slice(&1u32.to_le_bytes());
    img[24..32].copy_from_slice(&entry.to_le_bytes());
    img[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    img[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    img[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    img[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum

    let len = img.len() as u64;
    let note_off = 0xb0usize;
    let note_len = 20u64;
    let phdr = |img: &mut Vec<u8>,
                at: usize,
                p_type: u32,
                flags: u32,
                off: u64,
                addr: u64,
                size: u64,
                align: u64| {
        img[at..at + 4].copy_from_slice(&p_type.to_le_bytes());
        img[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
        img[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        img[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        img[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        img[at + 32..at + 40].copy_from_slice(&size.to_le_bytes()); // p_filesz
        img[at + 40..at + 48].copy_from_slice(&size.to_le_bytes()); // p_memsz
        img[at + 48..at + 56].copy_from_slice(&align.to_le_bytes());
    };
    phdr(&mut img, 64, 1, 7, 0, LOAD_ADDR, len, 0x1000); // PT_LOAD rwx
    phdr(
        &mut img,
        120,
        4,
        4,
        note_off as u64,
        LOAD_ADDR + note_off as u64,
        note_len,
        4,
    ); // PT_NOTE

    // PVH note
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(entry as u32).to_le_bytes());
    img[note_off..note_off + note.len()].copy_from_slice(&note);

    // 32-bit code
    let mut code = vec![0xfc]; // cld
    code.push(0xbe); // mov esi, msg
    code.extend_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[
        0xac, // loop: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp loop
    ]);
    match ending {
        Ending::PowerOff => code.extend_from_slice(&POWER_OFF_CODE), // done: power off
        Ending::Reset => code.extend_from_slice(&RESET_CODE),        // done: reset
        Ending::Idle => {}
    }
    code.extend_from_slice(&[
        0xf4, // halt: hlt
        0xeb, 0xfd, // jmp halt
    ]);
    assert!(CODE_OFF + code.len() <= MSG_OFF);
    img[CODE_OFF..CODE_OFF + code.len()].copy_from_slice(&code);
    img[MSG_OFF..MSG_OFF + message.len()].copy_from_slice(message);
    img
}

/// Write the guest printing [`READY_LINE`] to `dir/pvh-guest.elf`.
pub fn write(dir: &Path) -> PathBuf {
    let path = dir.join("pvh-guest.elf");
    std::fs::write(&path, elf(READY_LINE)).expect("write pvh guest");
    path
}

/// Write the guest printing [`READY_LINE`] and powering off to `dir/pvh-poweroff.elf`.
pub fn write_power_off(dir: &Path) -> PathBuf {
    let path = dir.join("pvh-poweroff.elf");
    std::fs::write(&path, elf_with(READY_LINE, Ending::PowerOff)).expect("write pvh guest");
    path
}

/// Write the guest printing [`READY_LINE`] and resetting through the i8042 to
/// `dir/pvh-reset.elf`.
pub fn write_reset(dir: &Path) -> PathBuf {
    let path = dir.join("pvh-reset.elf");
    std::fs::write(&path, elf_with(READY_LINE, Ending::Reset)).expect("write pvh guest");
    path
}

/// The `VMRS_READY ...\n` line embedded in a test guest image (what the protocol peers print
/// on the guest's behalf).
pub fn ready_line(image: &[u8]) -> Option<Vec<u8>> {
    let start = image.windows(10).position(|w| w == b"VMRS_READY")?;
    let end = image[start..].iter().position(|&b| b == b'\n')?;
    Some(image[start..=start + end].to_vec())
}
