//! Key encodings. Integer keys are big-endian so sled's byte order is numeric order and range
//! scans come out sorted.

/// Key of a build or event id.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Inverse of [`u64_key`]; `None` when the key is not 8 bytes.
pub fn parse_u64_key(k: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = k.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

/// Key of the `outputs` tree (and name of a narinfo): a store path's 32-character hash
/// part, taken from its base name. Paths were checked when they entered the state, so a short
/// base name only happens with corrupt input, and then the whole base name is the key.
pub fn output_key(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.get(..32).unwrap_or(base)
}

/// Key of a hook work item: the hook's name, a 0 byte, then the event sequence number, so one
/// hook's items are contiguous and in event order.
pub fn hook_work_key(hook: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(hook.len() + 9);
    k.extend_from_slice(hook.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Inverse of [`hook_work_key`].
pub fn parse_hook_work_key(k: &[u8]) -> Option<(String, u64)> {
    let split = k.len().checked_sub(9)?;
    if k[split] != 0 {
        return None;
    }
    let hook = String::from_utf8(k[..split].to_vec()).ok()?;
    Some((hook, parse_u64_key(&k[split + 1..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_keys_sort_numerically() {
        assert!(u64_key(255) < u64_key(256));
        assert_eq!(parse_u64_key(&u64_key(42)), Some(42));
    }

    #[test]
    fn hook_work_keys_roundtrip_and_group_by_hook() {
        let k = hook_work_key("publish", 7);
        assert_eq!(parse_hook_work_key(&k), Some(("publish".into(), 7)));
        assert!(hook_work_key("a", 300) < hook_work_key("a", 301));
        assert!(hook_work_key("a", u64::MAX) < hook_work_key("b", 0));
    }
}
