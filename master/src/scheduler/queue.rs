//! Which pending pods a scheduling cycle tries, in the spirit of kube-scheduler's
//! scheduling queue. A pod that fitted nowhere is *parked*: later cycles skip it until
//! something happens that could let it fit, namely a node that appears, opens (Ready,
//! uncordoned), changes its labels or taints, or has more room (a pod bound to it was
//! deleted or finished, its allocatable grew). Then every parked pod is tried again.
//! A pod parked longer than [`PARK_LIMIT`] is tried again anyway (kube-scheduler's
//! `podMaxInUnschedulablePodsDuration`), which catches what the room cannot show (a pod
//! whose tolerations were edited).
//!
//! Why: with 10 000 pods pending and 100 nodes joining, trying every pending pod in
//! every cycle is 10⁶ filter runs per cycle, and each new node must wait for them.
//! Parked pods cost nothing until a change can help them.
//!
//! Pure: the caller passes the time and what it observed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::fit::Room;

/// The longest a parked pod waits without a helping change.
pub(crate) const PARK_LIMIT: Duration = Duration::from_secs(60);

/// A pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PodRef {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Pods that fitted nowhere, and since when.
    parked: HashMap<PodRef, Instant>,
    /// Each node's room as the previous cycle left it (its binds counted).
    rooms: HashMap<String, Room>,
}

impl Queue {
    /// Begin a cycle at `now`: `pending` are the pods waiting for a node, `rooms` what
    /// the nodes offer now. Forgets pods no longer pending, and un-parks every pod when
    /// the rooms changed in a way that may help one (or the pods parked too long).
    pub(crate) fn begin<'a>(
        &mut self,
        pending: impl IntoIterator<Item = &'a PodRef>,
        rooms: &HashMap<String, Room>,
        now: Instant,
    ) {
        let pending: std::collections::HashSet<&PodRef> = pending.into_iter().collect();
        self.parked.retain(|p, _| pending.contains(p));
        if may_help(&self.rooms, rooms) {
            self.parked.clear();
        } else {
            self.parked
                .retain(|_, since| now.saturating_duration_since(*since) < PARK_LIMIT);
        }
    }

    /// Whether this cycle tries `pod`.
    pub(crate) fn should_try(&self, pod: &PodRef) -> bool {
        !self.parked.contains_key(pod)
    }

    /// `pod` fitted nowhere in this cycle.
    pub(crate) fn park(&mut self, pod: PodRef, now: Instant) {
        self.parked.entry(pod).or_insert(now);
    }

    /// End the cycle: `rooms` with this cycle's binds counted.
    pub(crate) fn end(&mut self, rooms: HashMap<String, Room>) {
        self.rooms = rooms;
    }

    /// How many pods are parked.
    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }
}

/// Whether going from `before` to `after` may let a pod fit that fitted nowhere: a node
/// is new or newly open, changed labels or taints, or has more of some resource free.
/// A node that closed, left or filled up helps nobody.
fn may_help(before: &HashMap<String, Room>, after: &HashMap<String, Room>) -> bool {
    after.iter().any(|(name, now)| {
        now.open
            && before.get(name).is_none_or(|was| {
                !was.open
                    || was.shape != now.shape
                    || now.free.iter().zip(was.free).any(|(n, w)| *n > w + 1e-9)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn room(open: bool, pods: f64) -> Room {
        Room {
            open,
            shape: 7,
            free: [4.0, 8e9, pods],
        }
    }

    fn rooms(list: &[(&str, Room)]) -> HashMap<String, Room> {
        list.iter()
            .map(|(n, r)| (n.to_string(), r.clone()))
            .collect()
    }

    /// Runs one cycle in which every pod that is tried fits nowhere.
    fn cycle(
        q: &mut Queue,
        pending: &[PodRef],
        r: &HashMap<String, Room>,
        now: Instant,
    ) -> Vec<String> {
        q.begin(pending, r, now);
        let tried: Vec<&PodRef> = pending.iter().filter(|p| q.should_try(p)).collect();
        for p in &tried {
            q.park((*p).clone(), now);
        }
        let tried = tried.iter().map(|p| p.name.clone()).collect();
        q.end(r.clone());
        tried
    }

    #[test]
    fn parked_pods_wait_for_a_change_that_may_help() {
        let t = Instant::now();
        let mut q = Queue::default();
        let full = rooms(&[("n1", room(true, 0.0))]);
        let pending = [pod("a"), pod("b")];
        assert_eq!(cycle(&mut q, &pending, &full, t), ["a", "b"]);
        assert_eq!(q.parked(), 2);
        // Nothing changed: nobody is tried; a new pod is.
        let pending = [pod("a"), pod("b"), pod("c")];
        assert_eq!(cycle(&mut q, &pending, &full, t), ["c"]);
        // A node joins: everyone is tried again.
        let two = rooms(&[("n1", room(true, 0.0)), ("n2", room(false, 110.0))]);
        assert!(
            cycle(&mut q, &pending, &two, t).is_empty(),
            "a node that is not Ready helps nobody"
        );
        let ready = rooms(&[("n1", room(true, 0.0)), ("n2", room(true, 110.0))]);
        assert_eq!(cycle(&mut q, &pending, &ready, t), ["a", "b", "c"]);
    }

    #[test]
    fn freed_room_and_new_labels_help_and_filling_up_does_not() {
        let t = Instant::now();
        let mut q = Queue::default();
        let pending = [pod("a")];
        cycle(&mut q, &pending, &rooms(&[("n1", room(true, 1.0))]), t);
        assert!(cycle(&mut q, &pending, &rooms(&[("n1", room(true, 0.0))]), t).is_empty());
        assert!(
            cycle(&mut q, &pending, &rooms(&[]), t).is_empty(),
            "a node left"
        );
        cycle(&mut q, &pending, &rooms(&[("n1", room(true, 0.0))]), t);
        assert_eq!(
            cycle(&mut q, &pending, &rooms(&[("n1", room(true, 1.0))]), t),
            ["a"],
            "a pod slot was freed"
        );
        let mut relabelled = room(true, 1.0);
        relabelled.shape = 8;
        assert_eq!(
            cycle(&mut q, &pending, &rooms(&[("n1", relabelled)]), t),
            ["a"]
        );
    }

    #[test]
    fn long_parked_pods_are_tried_again_and_gone_pods_forgotten() {
        let t = Instant::now();
        let mut q = Queue::default();
        let r = rooms(&[("n1", room(true, 0.0))]);
        cycle(&mut q, &[pod("a"), pod("b")], &r, t);
        assert!(cycle(&mut q, &[pod("a"), pod("b")], &r, t + PARK_LIMIT / 2).is_empty());
        q.begin(&[pod("a")], &r, t + PARK_LIMIT / 2);
        assert_eq!(q.parked(), 1, "b was bound or deleted");
        assert_eq!(cycle(&mut q, &[pod("a")], &r, t + PARK_LIMIT), ["a"]);
    }
}
