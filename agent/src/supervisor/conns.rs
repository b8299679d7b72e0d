//! Counting a process's open TCP connections, from `/proc`: what a stop
//! that ran out of time cut (the target is 0).

use std::collections::HashSet;

/// TCP connections of process `pid` that are established (or still
/// closing from the peer's side) right now: its socket inodes, matched in
/// its network namespace's `/proc/<pid>/net/tcp` and `tcp6`. 0 when
/// `/proc` cannot tell (the process is gone, or not ours to read).
pub(crate) fn open_connections(pid: u32) -> u32 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: HashSet<u64> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    if inodes.is_empty() {
        return 0;
    }
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .map(|text| count(&text, &inodes))
        .fold(0u32, u32::saturating_add)
}

/// Rows of a `/proc/net/tcp` table whose inode is in `inodes` and whose
/// state is ESTABLISHED (01) or CLOSE_WAIT (08): connections with a peer
/// that still expects an answer.
fn count(table: &str, inodes: &HashSet<u64>) -> u32 {
    let n = table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            matches!(cols.get(3), Some(&"01" | &"08"))
                && cols
                    .get(9)
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| inodes.contains(&i))
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_sockets_of_this_process_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = open_connections(std::process::id());
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        // Both ends are this process's.
        assert_eq!(open_connections(std::process::id()), before + 2);
        drop((a, b));
        assert_eq!(open_connections(u32::MAX), 0);
    }

    #[test]
    fn the_table_is_read_by_state_and_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1000        0 222 1 0 20 4 30 10 -1\n\
   2: 0100007F:1F90 0100007F:A001 08 00000000:00000000 00:00000000 00000000  1000        0 333 1 0 20 4 30 10 -1\n\
   3: 0100007F:1F90 0100007F:A002 01 00000000:00000000 00:00000000 00000000  1000        0 444 1 0 20 4 30 10 -1\n";
        let ours: HashSet<u64> = [111, 222, 333].into_iter().collect();
        assert_eq!(count(table, &ours), 2);
        assert_eq!(count("", &ours), 0);
    }
}
