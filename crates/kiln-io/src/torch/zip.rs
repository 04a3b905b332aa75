//! A minimal read-only zip reader for `torch.save` archives: the central directory (with zip64
//! records), stored (uncompressed) entries as zero-copy slices. Every offset and length is
//! checked against the archive's size with checked arithmetic.

use std::collections::HashMap;
use std::ops::Range;

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// One archive member.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Compression method (0: stored).
    pub method: u16,
    /// General-purpose flags (bit 0: encrypted).
    pub flags: u16,
    /// The member's bytes in the archive (compressed size).
    pub data: Range<usize>,
}

/// The members of a zip archive, by name.
#[derive(Debug)]
pub(crate) struct ZipIndex {
    /// Names in central-directory order.
    pub names: Vec<String>,
    pub entries: HashMap<String, Entry>,
}

type ZResult<T> = std::result::Result<T, String>;

fn u16_at(b: &[u8], p: usize) -> ZResult<u16> {
    p.checked_add(2)
        .and_then(|e| b.get(p..e))
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| format!("2-byte field at {p} is past the end ({} bytes)", b.len()))
}

fn u32_at(b: &[u8], p: usize) -> ZResult<u32> {
    p.checked_add(4)
        .and_then(|e| b.get(p..e))
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("4-byte field at {p} is past the end ({} bytes)", b.len()))
}

fn u64_at(b: &[u8], p: usize) -> ZResult<u64> {
    p.checked_add(8)
        .and_then(|e| b.get(p..e))
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("8-byte field at {p} is past the end ({} bytes)", b.len()))
}

fn to_usize(v: u64, what: &str, len: usize) -> ZResult<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&x| x <= len)
        .ok_or_else(|| format!("{what} {v} exceeds the archive size {len}"))
}

/// True when `b` starts like a zip archive (a local file header).
pub(crate) fn is_zip(b: &[u8]) -> bool {
    b.len() >= 4 && u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) == LOCAL_SIG
}

/// Reads the central directory of archive `b`.
pub(crate) fn read_index(b: &[u8]) -> ZResult<ZipIndex> {
    let len = b.len();
    // End of central directory: 22 bytes plus a comment of up to 65535, at the end.
    if len < 22 {
        return Err(format!(
            "{len} bytes is too short for a zip end-of-central-directory record"
        ));
    }
    let lowest = len.saturating_sub(22 + 0xffff);
    let eocd = (lowest..=len - 22)
        .rev()
        .find(|&p| {
            u32_at(b, p) == Ok(EOCD_SIG)
                && u16_at(b, p + 20).is_ok_and(|c| p + 22 + c as usize <= len)
        })
        .ok_or("no end-of-central-directory record (truncated or not a zip archive)")?;
    let mut count = u16_at(b, eocd + 10)? as u64;
    let mut cd_size = u32_at(b, eocd + 12)? as u64;
    let mut cd_off = u32_at(b, eocd + 16)? as u64;
    if eocd >= 20 && u32_at(b, eocd - 20)? == ZIP64_LOCATOR_SIG {
        let z = to_usize(u64_at(b, eocd - 12)?, "zip64 end record offset", len)?;
        if u32_at(b, z)? != ZIP64_EOCD_SIG {
            return Err(format!("no zip64 end-of-central-directory record at {z}"));
        }
        count = u64_at(b, z + 32)?;
        cd_size = u64_at(b, z + 40)?;
        cd_off = u64_at(b, z + 48)?;
    }
    let cd_start = to_usize(cd_off, "central directory offset", len)?;
    let cd_end = cd_off
        .checked_add(cd_size)
        .filter(|&e| e <= len as u64)
        .ok_or_else(|| {
            format!("central directory {cd_off}+{cd_size} exceeds the archive size {len}")
        })? as usize;
    // Each central entry takes at least 46 bytes: a count beyond that is corrupt (and bounds
    // everything allocated below).
    if count > (cd_end - cd_start) as u64 / 46 {
        return Err(format!(
            "{count} entries cannot fit in a {}-byte central directory",
            cd_end - cd_start
        ));
    }
    let mut names = Vec::with_capacity(count as usize);
    let mut entries = HashMap::with_capacity(count as usize);
    let mut p = cd_start;
    for i in 0..count {
        if u32_at(b, p)? != CENTRAL_SIG {
            return Err(format!(
                "central directory entry {i} at {p} has a bad signature"
            ));
        }
        let flags = u16_at(b, p + 8)?;
        let method = u16_at(b, p + 10)?;
        let mut csize = u32_at(b, p + 20)? as u64;
        let usize_ = u32_at(b, p + 24)? as u64;
        let name_len = u16_at(b, p + 28)? as usize;
        let extra_len = u16_at(b, p + 30)? as usize;
        let comment_len = u16_at(b, p + 32)? as usize;
        let mut local = u32_at(b, p + 42)? as u64;
        let name_start = p + 46;
        let extra_start = name_start + name_len;
        let next = extra_start + extra_len + comment_len;
        if next > cd_end {
            return Err(format!(
                "central directory entry {i} at {p} runs past the directory end {cd_end}"
            ));
        }
        let name = std::str::from_utf8(&b[name_start..extra_start])
            .map_err(|_| format!("entry {i}: name is not UTF-8"))?
            .to_string();
        // zip64 extra field: the 64-bit values of the fields saturated at 0xffffffff, in order.
        let mut q = extra_start;
        while q + 4 <= extra_start + extra_len {
            let id = u16_at(b, q)?;
            let n = u16_at(b, q + 2)? as usize;
            let body = q + 4;
            if body + n > extra_start + extra_len {
                return Err(format!("entry '{name}': extra field runs past its end"));
            }
            if id == 1 {
                let mut f = body;
                let mut next64 = |v: &mut u64| -> ZResult<()> {
                    if *v == 0xffff_ffff {
                        if f + 8 > body + n {
                            return Err(format!("entry '{name}': zip64 extra field too short"));
                        }
                        *v = u64_at(b, f)?;
                        f += 8;
                    }
                    Ok(())
                };
                let mut u = usize_;
                next64(&mut u)?;
                next64(&mut csize)?;
                next64(&mut local)?;
            }
            q = body + n;
        }
        let local = to_usize(local, &format!("entry '{name}': local header offset"), len)?;
        if u32_at(b, local)? != LOCAL_SIG {
            return Err(format!("entry '{name}': no local file header at {local}"));
        }
        let lname = u16_at(b, local + 26)? as usize;
        let lextra = u16_at(b, local + 28)? as usize;
        let start = local + 30 + lname + lextra;
        let end = (start as u64)
            .checked_add(csize)
            .filter(|&e| e <= len as u64)
            .ok_or_else(|| {
                format!("entry '{name}': data {start}+{csize} exceeds the archive size {len}")
            })? as usize;
        if entries
            .insert(
                name.clone(),
                Entry {
                    method,
                    flags,
                    data: start..end,
                },
            )
            .is_some()
        {
            return Err(format!("entry '{name}' appears twice"));
        }
        names.push(name);
        p = next;
    }
    Ok(ZipIndex { names, entries })
}

impl ZipIndex {
    /// The bytes of stored member `name`, or `None` when there is no such member.
    pub fn get<'a>(&self, b: &'a [u8], name: &str) -> ZResult<Option<&'a [u8]>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        if e.flags & 1 != 0 {
            return Err(format!("entry '{name}' is encrypted"));
        }
        if e.method != 0 {
            return Err(format!(
                "entry '{name}' is compressed (method {}); torch.save writes stored entries only",
                e.method
            ));
        }
        Ok(Some(&b[e.data.clone()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-member archive whose sizes and offsets all live in zip64 records (as writers emit
    /// for archives over 4 GiB).
    fn zip64_archive(data: &[u8]) -> Vec<u8> {
        let name = b"arch/data/0";
        let n = data.len() as u64;
        let mut b = Vec::new();
        b.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        b.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(&20u16.to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&[1, 0, 16, 0]);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(data);
        let cd = b.len() as u64;
        b.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        b.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(&28u16.to_le_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&[0xff; 4]);
        b.extend_from_slice(name);
        b.extend_from_slice(&[1, 0, 24, 0]);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let cd_size = b.len() as u64 - cd;
        let z = b.len() as u64;
        b.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        b.extend_from_slice(&44u64.to_le_bytes());
        b.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [1u64, 1, cd_size, cd] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&z.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&EOCD_SIG.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&[0, 0]);
        b
    }

    #[test]
    fn zip64_records_are_followed() {
        let b = zip64_archive(b"hello torch");
        assert!(is_zip(&b));
        let idx = read_index(&b).unwrap();
        assert_eq!(idx.names, ["arch/data/0"]);
        assert_eq!(
            idx.get(&b, "arch/data/0").unwrap(),
            Some(&b"hello torch"[..])
        );
        assert_eq!(idx.get(&b, "arch/data/1").unwrap(), None);
    }

    #[test]
    fn truncated_or_corrupt_archives_are_errors() {
        let b = zip64_archive(b"hello torch");
        for n in 0..b.len() {
            assert!(read_index(&b[..n]).is_err(), "truncated at {n}");
        }
        // An entry count no central directory can hold.
        let mut m = b.clone();
        let z = m.len() - 22 - 20 - 56;
        m[z + 32..z + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = read_index(&m).unwrap_err();
        assert!(e.contains("entries cannot fit"), "{e}");
        // A member running past the end.
        let mut m = b.clone();
        let size_at = m.len() - 22 - 20 - 56 - 24;
        m[size_at + 8..size_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = read_index(&m).unwrap_err();
        assert!(e.contains("exceeds the archive size"), "{e}");
    }
}
