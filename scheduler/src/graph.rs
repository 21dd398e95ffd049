//! Dependency rules as pure functions.

use std::collections::{HashMap, HashSet};

/// A cycle among the tasks of one submission (self-dependencies included):
/// returns the ids on the first cycle found, in order.
pub fn find_cycle<'a>(tasks: impl IntoIterator<Item = (&'a str, &'a [String])>) -> Option<Vec<String>> {
    let graph: HashMap<&str, Vec<&str>> =
        tasks.into_iter().map(|(id, deps)| (id, deps.iter().map(String::as_str).collect())).collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    let mut ids: Vec<&str> = graph.keys().copied().collect();
    ids.sort_unstable();
    for start in ids {
        if marks.contains_key(start) {
            continue;
        }
        // Iterative DFS: (node, next child index); the path is the stack.
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Visiting);
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let children = graph.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if *next < children.len() {
                let child = children[*next];
                *next += 1;
                if !graph.contains_key(child) {
                    continue; // outside this submission: cannot close a cycle here
                }
                match marks.get(child) {
                    Some(Mark::Visiting) => {
                        let from = stack.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        return Some(stack[from..].iter().map(|(n, _)| n.to_string()).collect());
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(child, Mark::Visiting);
                        stack.push((child, 0));
                    }
                }
            } else {
                marks.insert(node, Mark::Done);
                stack.pop();
            }
        }
    }
    None
}

/// Ids a submission depends on that it does not contain itself.
pub fn external_dependencies<'a>(
    tasks: impl IntoIterator<Item = (&'a str, &'a [String])> + Clone,
) -> HashSet<String> {
    let own: HashSet<&str> = tasks.clone().into_iter().map(|(id, _)| id).collect();
    tasks
        .into_iter()
        .flat_map(|(_, deps)| deps.iter())
        .filter(|d| !own.contains(d.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_cycle_in_a_dag() {
        let a = v(&[]);
        let b = v(&["a"]);
        let c = v(&["a", "b", "outside"]);
        assert_eq!(find_cycle([("a", &a[..]), ("b", &b[..]), ("c", &c[..])]), None);
    }

    #[test]
    fn finds_cycles() {
        let a = v(&["c"]);
        let b = v(&["a"]);
        let c = v(&["b"]);
        let cycle = find_cycle([("a", &a[..]), ("b", &b[..]), ("c", &c[..])]).unwrap();
        assert_eq!(cycle.len(), 3);
        let s = v(&["self"]);
        assert_eq!(find_cycle([("self", &s[..])]), Some(v(&["self"])));
    }

    #[test]
    fn external_dependencies_are_listed() {
        let a = v(&["x"]);
        let b = v(&["a", "y"]);
        let ext = external_dependencies([("a", &a[..]), ("b", &b[..])]);
        assert_eq!(ext, HashSet::from(["x".to_string(), "y".to_string()]));
    }
}
