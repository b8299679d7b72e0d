//! Dependency graphs of services, by index: `after[i]` lists the services
//! `i` must come after. Everything here is iterative — no recursion that a
//! long chain could overflow the stack with — and linear in the services
//! and edges (the order adds a log factor for its tie-break).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// The graph of `names`, where `deps(i)` names what service `i` comes
/// after. Names not among `names`, and repeats, are left out.
pub fn build<'a, D>(names: &[&'a str], deps: impl Fn(usize) -> D) -> Vec<Vec<usize>>
where
    D: IntoIterator<Item = &'a str>,
{
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    (0..names.len())
        .map(|i| {
            let mut out: Vec<usize> = Vec::new();
            for d in deps(i) {
                if let Some(&j) = index.get(d)
                    && !out.contains(&j)
                {
                    out.push(j);
                }
            }
            out
        })
        .collect()
}

/// A cycle as indices `a, b, …, a`, if the graph has one (the first a
/// depth-first search from the lowest index meets).
pub fn cycle(after: &[Vec<usize>]) -> Option<Vec<usize>> {
    const WHITE: u8 = 0;
    const ON_PATH: u8 = 1;
    const DONE: u8 = 2;
    let mut color = vec![WHITE; after.len()];
    // The current path: (node, index of its next edge).
    let mut path: Vec<(usize, usize)> = Vec::new();
    for start in 0..after.len() {
        if color[start] != WHITE {
            continue;
        }
        color[start] = ON_PATH;
        path.push((start, 0));
        while let Some(top) = path.last_mut() {
            let (node, edge) = *top;
            let Some(&next) = after[node].get(edge) else {
                color[node] = DONE;
                path.pop();
                continue;
            };
            top.1 += 1;
            match color[next] {
                WHITE => {
                    color[next] = ON_PATH;
                    path.push((next, 0));
                }
                ON_PATH => {
                    let at = path.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut found: Vec<usize> = path[at..].iter().map(|(n, _)| *n).collect();
                    found.push(next);
                    return Some(found);
                }
                _ => {}
            }
        }
    }
    None
}

/// A topological order: every service after what it depends on, and among
/// the services free to go, the lowest index first. Services on a cycle
/// are missing from it.
pub fn order(after: &[Vec<usize>]) -> Vec<usize> {
    let mut waiting: Vec<usize> = after.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); after.len()];
    for (i, deps) in after.iter().enumerate() {
        for &d in deps {
            dependents[d].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..after.len())
        .filter(|i| waiting[*i] == 0)
        .map(Reverse)
        .collect();
    let mut out = Vec::with_capacity(after.len());
    while let Some(Reverse(i)) = ready.pop() {
        out.push(i);
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    out
}

/// The services in waves: wave 0 depends on nothing, each later one only on
/// earlier waves (its longest chain of dependencies); within a wave, by
/// index. Services on a cycle are left out.
pub fn waves(after: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let order = order(after);
    let mut level: Vec<Option<usize>> = vec![None; after.len()];
    for &i in &order {
        level[i] = Some(
            after[i]
                .iter()
                .filter_map(|d| level[*d])
                .map(|l| l + 1)
                .max()
                .unwrap_or(0),
        );
    }
    let count = level.iter().flatten().max().map_or(0, |m| m + 1);
    let mut waves = vec![Vec::new(); count];
    for (i, l) in level.iter().enumerate() {
        if let Some(l) = l {
            waves[*l].push(i);
        }
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<Vec<usize>> {
        // Each service comes after the next one: the reverse of file order.
        (0..n)
            .map(|i| if i + 1 < n { vec![i + 1] } else { vec![] })
            .collect()
    }

    #[test]
    fn orders_cycles_and_waves() {
        let g = vec![vec![1], vec![], vec![1]];
        assert_eq!(order(&g), vec![1, 0, 2]);
        assert_eq!(waves(&g), vec![vec![1], vec![0, 2]]);
        assert_eq!(cycle(&g), None);
        let ring = vec![vec![2], vec![0], vec![1]];
        assert_eq!(cycle(&ring), Some(vec![0, 2, 1, 0]));
        assert!(order(&ring).is_empty());
        assert!(waves(&ring).is_empty());
        let names = ["a", "b", "c"];
        let deps = [vec!["b", "b", "zz"], vec![], vec!["a"]];
        assert_eq!(
            build(&names, |i| deps[i].iter().copied()),
            vec![vec![1], vec![], vec![0]]
        );
    }

    #[test]
    fn a_hundred_thousand_services_in_a_chain_or_a_ring_take_no_stack_and_little_time() {
        let n = 100_000;
        let started = std::time::Instant::now();
        let g = chain(n);
        assert_eq!(cycle(&g), None);
        assert_eq!(order(&g).first(), Some(&(n - 1)));
        assert_eq!(waves(&g).len(), n);
        let mut ring = chain(n);
        ring[n - 1].push(0);
        let c = cycle(&ring).unwrap();
        assert_eq!(c.len(), n + 1);
        assert!(order(&ring).is_empty());
        // Linear work: far below a second even unoptimised and loaded.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
