//! `/proc/<pid>/fdinfo/<fd>`: what the kernel says of a descriptor. For a BPF map, its id,
//! sizes and the memory the kernel charges for it (`memlock`); for a program, its id. Read
//! by the agent (its own maps' memory and pressure) and by the tests and benchmarks (another
//! process's).

/// The value of field `name` in an fdinfo text (`name:\tvalue` lines).
pub fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// One BPF map as `/proc/<pid>/fdinfo/<fd>` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdMap {
    pub map_id: u32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Bytes the kernel charges for the map.
    pub memlock: u64,
}

/// The map an fdinfo text describes; `None` for a descriptor that is not a BPF map (no
/// `map_id`) or a text without the fields a map's has.
pub fn parse_fdinfo(text: &str) -> Option<FdMap> {
    let num = |name: &str| field(text, name)?.parse::<u64>().ok();
    let small = |name: &str| u32::try_from(num(name)?).ok();
    Some(FdMap {
        map_id: small("map_id")?,
        map_type: small("map_type")?,
        key_size: small("key_size")?,
        value_size: small("value_size")?,
        max_entries: small("max_entries")?,
        memlock: num("memlock")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/fdinfo/<fd>` of an LRU hash map, as kernel 6.x writes it.
    const LRU_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\n\
        map_type:\t9\nkey_size:\t44\nvalue_size:\t16\nmax_entries:\t64\nmap_flags:\t0x0\n\
        map_extra:\t0x0\nmemlock:\t12672\nmap_id:\t42\nfrozen:\t0\n";

    #[test]
    fn fdinfo_of_a_map_gives_its_sizes_and_memory() {
        assert_eq!(
            parse_fdinfo(LRU_FDINFO),
            Some(FdMap {
                map_id: 42,
                map_type: 9,
                key_size: 44,
                value_size: 16,
                max_entries: 64,
                memlock: 12672,
            })
        );
    }

    #[test]
    fn fdinfo_of_other_descriptors_is_no_map() {
        // A socket, and a BPF program (which has memlock and prog_id, but no map_id).
        let socket = "pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t31337\n";
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\n\
            prog_type:\t6\nprog_jited:\t1\nprog_tag:\tabcdef0123456789\nmemlock:\t4096\n\
            prog_id:\t7\nrun_time_ns:\t0\nrun_cnt:\t0\n";
        assert_eq!(parse_fdinfo(socket), None);
        assert_eq!(parse_fdinfo(prog), None);
        assert_eq!(field(prog, "prog_id"), Some("7"));
        // A map's id without its other fields: no map read, but the id is there to say so.
        assert_eq!(parse_fdinfo("map_id:\t7\n"), None);
        assert_eq!(field("map_id:\t7\n", "map_id"), Some("7"));
        // A map line that does not parse is not guessed at.
        assert_eq!(
            parse_fdinfo(&LRU_FDINFO.replace("memlock:\t12672", "memlock:\tlots")),
            None
        );
    }
}
