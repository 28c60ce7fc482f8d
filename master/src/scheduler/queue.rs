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

use std::collections::{BTreeSet, HashMap};
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

#[cfg(test)]
impl PodRef {
    pub(crate) fn in_default(name: &str) -> Self {
        Self {
            namespace: "default".into(),
            name: name.into(),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Pods the next cycle tries, in order.
    active: BTreeSet<PodRef>,
    /// Pods that fitted nowhere, and since when.
    parked: HashMap<PodRef, Instant>,
    /// Each node's room as the previous cycle left it (its binds counted).
    rooms: HashMap<String, Room>,
}

impl Queue {
    /// `pod` waits for a node and may fit now: it is new, its spec changed, or its bind
    /// failed. The next cycle tries it.
    pub(crate) fn add(&mut self, pod: PodRef) {
        self.parked.remove(&pod);
        self.active.insert(pod);
    }

    /// `pod` no longer waits (bound, being deleted, or gone).
    pub(crate) fn remove(&mut self, pod: &PodRef) {
        self.active.remove(pod);
        self.parked.remove(pod);
    }

    /// Whether a cycle at `now` has pods to try even if no room changed.
    pub(crate) fn has_work(&self, now: Instant) -> bool {
        !self.active.is_empty() || self.parked.values().any(|since| overdue(*since, now))
    }

    /// Begin a cycle at `now`, the nodes offering `rooms`: the pods to try, in order.
    /// Every parked pod is among them when the rooms changed in a way that may help one;
    /// else those parked for [`PARK_LIMIT`].
    pub(crate) fn begin(&mut self, rooms: &HashMap<String, Room>, now: Instant) -> Vec<PodRef> {
        if may_help(&self.rooms, rooms) {
            self.active.extend(self.parked.drain().map(|(p, _)| p));
        } else {
            let due: Vec<PodRef> = self
                .parked
                .iter()
                .filter(|(_, since)| overdue(**since, now))
                .map(|(p, _)| p.clone())
                .collect();
            for p in due {
                self.parked.remove(&p);
                self.active.insert(p);
            }
        }
        std::mem::take(&mut self.active).into_iter().collect()
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

fn overdue(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) >= PARK_LIMIT
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
        PodRef::in_default(name)
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

    /// Runs one cycle in which every pod tried fits nowhere; returns the names tried.
    fn cycle(q: &mut Queue, r: &HashMap<String, Room>, now: Instant) -> Vec<String> {
        let tried = q.begin(r, now);
        for p in &tried {
            q.park(p.clone(), now);
        }
        q.end(r.clone());
        tried.into_iter().map(|p| p.name).collect()
    }

    #[test]
    fn parked_pods_wait_for_a_change_that_may_help() {
        let t = Instant::now();
        let mut q = Queue::default();
        let full = rooms(&[("n1", room(true, 0.0))]);
        q.add(pod("a"));
        q.add(pod("b"));
        assert!(q.has_work(t));
        assert_eq!(cycle(&mut q, &full, t), ["a", "b"]);
        assert_eq!(q.parked(), 2);
        assert!(!q.has_work(t), "nothing to try until something changes");
        // Nothing changed: only a new pod is tried.
        q.add(pod("c"));
        assert_eq!(cycle(&mut q, &full, t), ["c"]);
        // A node that is not Ready helps nobody; once Ready, everyone is tried again.
        let two = rooms(&[("n1", room(true, 0.0)), ("n2", room(false, 110.0))]);
        assert!(cycle(&mut q, &two, t).is_empty());
        let ready = rooms(&[("n1", room(true, 0.0)), ("n2", room(true, 110.0))]);
        assert_eq!(cycle(&mut q, &ready, t), ["a", "b", "c"]);
    }

    #[test]
    fn freed_room_and_new_labels_help_and_filling_up_does_not() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.add(pod("a"));
        cycle(&mut q, &rooms(&[("n1", room(true, 1.0))]), t);
        assert!(cycle(&mut q, &rooms(&[("n1", room(true, 0.0))]), t).is_empty());
        assert!(cycle(&mut q, &rooms(&[]), t).is_empty(), "a node left");
        cycle(&mut q, &rooms(&[("n1", room(true, 0.0))]), t);
        assert_eq!(
            cycle(&mut q, &rooms(&[("n1", room(true, 1.0))]), t),
            ["a"],
            "a pod slot was freed"
        );
        let mut relabelled = room(true, 1.0);
        relabelled.shape = 8;
        assert_eq!(cycle(&mut q, &rooms(&[("n1", relabelled)]), t), ["a"]);
    }

    #[test]
    fn long_parked_pods_are_tried_again_and_removed_pods_are_not() {
        let t = Instant::now();
        let mut q = Queue::default();
        let r = rooms(&[("n1", room(true, 0.0))]);
        q.add(pod("a"));
        q.add(pod("b"));
        cycle(&mut q, &r, t);
        assert!(cycle(&mut q, &r, t + PARK_LIMIT / 2).is_empty());
        q.remove(&pod("b"));
        assert_eq!(q.parked(), 1, "b was bound or deleted");
        assert!(q.has_work(t + PARK_LIMIT));
        assert_eq!(cycle(&mut q, &r, t + PARK_LIMIT), ["a"]);
        q.add(pod("c"));
        q.remove(&pod("c"));
        assert!(cycle(&mut q, &r, t + PARK_LIMIT).is_empty());
    }
}
