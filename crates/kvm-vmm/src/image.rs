//! Guest images: a flat binary, or an ELF64 executable whose `PT_LOAD` segments are
//! copied to their physical addresses (a small parser: no relocation, no dynamic linking;
//! the guest is linked at [`IMAGE_BASE`]).

use crate::abi::{IMAGE_BASE, IMAGE_LIMIT};
use crate::Error;

/// A guest image to load.
#[derive(Clone, Debug)]
pub enum GuestImage {
    /// Raw machine code loaded at [`IMAGE_BASE`] and entered at its first byte.
    Flat(Vec<u8>),
    /// An ELF64 x86-64 executable (`ET_EXEC`) linked inside
    /// `IMAGE_BASE..IMAGE_LIMIT`: its `PT_LOAD` segments are loaded at their physical
    /// addresses and it is entered at `e_entry`.
    Elf(Vec<u8>),
}

/// One piece of an image: bytes to copy to a guest-physical address, then zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// The bytes to copy there.
    pub data: Vec<u8>,
    /// Bytes of zeros after them (`.bss`).
    pub zeros: u64,
}

/// An image parsed and checked against the image area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Where every vCPU starts.
    pub entry: u64,
    /// What to write into guest memory.
    pub segments: Vec<Segment>,
}

const PT_LOAD: u32 = 1;

fn bytes<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], Error> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::ImageLoad(format!("truncated: no {N} bytes at offset {at}")))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, Error> {
    bytes::<2>(b, at).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, Error> {
    bytes::<4>(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, Error> {
    bytes::<8>(b, at).map(u64::from_le_bytes)
}

fn check_range(addr: u64, len: u64) -> Result<(), Error> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| Error::ImageLoad(format!("segment at {addr:#x} wraps around")))?;
    if addr < IMAGE_BASE {
        return Err(Error::ImageLoad(format!(
            "segment at {addr:#x} starts below the image area ({IMAGE_BASE:#x}): link the \
             guest at {IMAGE_BASE:#x}"
        )));
    }
    if end > IMAGE_LIMIT {
        return Err(Error::ImageTooBig {
            end,
            limit: IMAGE_LIMIT,
        });
    }
    Ok(())
}

impl GuestImage {
    /// Parses the image and checks that it fits the image area.
    pub fn parse(&self) -> Result<LoadedImage, Error> {
        match self {
            GuestImage::Flat(code) => {
                if code.is_empty() {
                    return Err(Error::ImageLoad("empty flat image".into()));
                }
                check_range(IMAGE_BASE, code.len() as u64)?;
                Ok(LoadedImage {
                    entry: IMAGE_BASE,
                    segments: vec![Segment {
                        addr: IMAGE_BASE,
                        data: code.clone(),
                        zeros: 0,
                    }],
                })
            }
            GuestImage::Elf(elf) => parse_elf(elf),
        }
    }
}

fn parse_elf(b: &[u8]) -> Result<LoadedImage, Error> {
    if b.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(Error::ImageLoad("not an ELF file (bad magic)".into()));
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err(Error::ImageLoad(
            "not a little-endian ELF64 file (class or data byte)".into(),
        ));
    }
    let e_type = u16_at(b, 16)?;
    let machine = u16_at(b, 18)?;
    if machine != 0x3E {
        return Err(Error::ImageLoad(format!(
            "not an x86-64 executable (e_machine {machine:#x})"
        )));
    }
    if e_type != 2 {
        return Err(Error::ImageLoad(format!(
            "not a position-dependent executable (e_type {e_type}, want ET_EXEC = 2): link \
             with relocation-model=static"
        )));
    }
    let entry = u64_at(b, 24)?;
    let phoff = u64_at(b, 32)? as usize;
    let phentsize = u16_at(b, 54)? as usize;
    let phnum = u16_at(b, 56)? as usize;
    if phentsize < 56 {
        return Err(Error::ImageLoad(format!(
            "program header entries of {phentsize} bytes (want 56)"
        )));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| Error::ImageLoad("program header offset overflows".into()))?;
        if u32_at(b, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(b, ph + 8)? as usize;
        let paddr = u64_at(b, ph + 24)?;
        let filesz = u64_at(b, ph + 32)? as usize;
        let memsz = u64_at(b, ph + 40)?;
        if memsz < filesz as u64 {
            return Err(Error::ImageLoad(format!(
                "segment {i}: p_memsz {memsz} < p_filesz {filesz}"
            )));
        }
        if memsz == 0 {
            continue;
        }
        check_range(paddr, memsz)?;
        let data = offset
            .checked_add(filesz)
            .and_then(|end| b.get(offset..end))
            .ok_or_else(|| {
                Error::ImageLoad(format!(
                    "segment {i}: file bytes {offset}..+{filesz} outside the file"
                ))
            })?;
        segments.push(Segment {
            addr: paddr,
            data: data.to_vec(),
            zeros: memsz - filesz as u64,
        });
    }
    if segments.is_empty() {
        return Err(Error::ImageLoad("no PT_LOAD segment".into()));
    }
    if !segments
        .iter()
        .any(|s| s.addr <= entry && entry < s.addr + s.data.len() as u64)
    {
        return Err(Error::ImageLoad(format!(
            "the entry point {entry:#x} is in no loaded segment"
        )));
    }
    Ok(LoadedImage { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 executable with one PT_LOAD segment.
    fn elf(paddr: u64, code: &[u8], memsz: u64, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&0x3Eu16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn elf_segments_load_with_bss() {
        let img = GuestImage::Elf(elf(IMAGE_BASE, &[0xF4, 0x90], 4096, IMAGE_BASE));
        let l = img.parse().unwrap();
        assert_eq!(l.entry, IMAGE_BASE);
        assert_eq!(
            l.segments,
            vec![Segment {
                addr: IMAGE_BASE,
                data: vec![0xF4, 0x90],
                zeros: 4094
            }]
        );
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        let e = GuestImage::Elf(b"MZ\x90\x00".to_vec()).parse().unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        let e = GuestImage::Elf(elf(0x1000, &[0xF4], 1, 0x1000))
            .parse()
            .unwrap_err();
        assert!(e.to_string().contains("below the image area"), "{e}");
        let e = GuestImage::Elf(elf(IMAGE_BASE, &[0xF4], IMAGE_LIMIT, IMAGE_BASE))
            .parse()
            .unwrap_err();
        assert!(matches!(e, Error::ImageTooBig { .. }), "{e}");
        assert!(e.to_string().contains("too big"), "{e}");
        let e = GuestImage::Elf(elf(IMAGE_BASE, &[0xF4], 1, IMAGE_BASE + 8))
            .parse()
            .unwrap_err();
        assert!(e.to_string().contains("entry point"), "{e}");
        let mut t = elf(IMAGE_BASE, &[0xF4], 1, IMAGE_BASE);
        t.truncate(100);
        assert!(GuestImage::Elf(t).parse().is_err());
        let e = GuestImage::Flat(vec![0x90; (IMAGE_LIMIT - IMAGE_BASE + 1) as usize])
            .parse()
            .unwrap_err();
        assert!(matches!(e, Error::ImageTooBig { .. }), "{e}");
    }
}
