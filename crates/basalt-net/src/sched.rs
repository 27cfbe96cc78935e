//! The per-connection send scheduler.
//!
//! Every frame waits in the queue of its traffic class. Control frames (Raft
//! heartbeats, metadata) always go first: a rebuild must never delay an
//! election. Foreground (guest I/O) and background (rebuild, rebalance,
//! scrub) share what is left by weight, with deficit round robin over bytes,
//! so a stream of large background frames cannot starve small foreground
//! ones and neither class is starved while the other is busy. When only one
//! of them has frames it gets the whole link.

use std::collections::VecDeque;

use crate::frame::{Frame, TrafficClass};

/// Bytes a weight of 1 earns per round.
const QUANTUM_BYTES: u64 = 64 << 10;

/// Relative shares of the link for foreground and background traffic when
/// both have frames waiting. Control traffic is not weighted: it goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassWeights {
    /// Share of the foreground class.
    pub foreground: u32,
    /// Share of the background class.
    pub background: u32,
}

impl Default for ClassWeights {
    /// Foreground gets four fifths of a contended link.
    fn default() -> ClassWeights {
        ClassWeights {
            foreground: 4,
            background: 1,
        }
    }
}

/// Frames waiting to be sent on one connection, by class.
#[derive(Debug)]
pub struct ClassQueues {
    queues: [VecDeque<Frame>; 3],
    queued_bytes: [u64; 3],
    /// Deficit counters of foreground [0] and background [1].
    deficit: [u64; 2],
    /// Whose turn it is among foreground [0] and background [1].
    turn: usize,
    quantum: [u64; 2],
}

impl ClassQueues {
    /// Empty queues with the given weights (a weight of 0 counts as 1).
    pub fn new(weights: ClassWeights) -> ClassQueues {
        ClassQueues {
            queues: Default::default(),
            queued_bytes: [0; 3],
            deficit: [0; 2],
            turn: 0,
            quantum: [
                u64::from(weights.foreground.max(1)) * QUANTUM_BYTES,
                u64::from(weights.background.max(1)) * QUANTUM_BYTES,
            ],
        }
    }

    /// Queues a frame in its class.
    pub fn push(&mut self, frame: Frame) {
        let class = frame.class as usize;
        self.queued_bytes[class] += frame.wire_len() as u64;
        self.queues[class].push_back(frame);
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// Bytes waiting in a class.
    pub fn queued_bytes(&self, class: TrafficClass) -> u64 {
        self.queued_bytes[class as usize]
    }

    /// Removes every waiting frame.
    pub fn drain_all(&mut self) -> Vec<Frame> {
        self.queued_bytes = [0; 3];
        self.deficit = [0; 2];
        self.queues.iter_mut().flat_map(|q| q.drain(..)).collect()
    }

    /// The next frame to send.
    pub fn pop(&mut self) -> Option<Frame> {
        if let Some(frame) = self.queues[TrafficClass::Control as usize].pop_front() {
            return Some(self.account(frame));
        }
        let weighted = [
            TrafficClass::Foreground as usize,
            TrafficClass::Background as usize,
        ];
        let busy = [
            !self.queues[weighted[0]].is_empty(),
            !self.queues[weighted[1]].is_empty(),
        ];
        match busy {
            [false, false] => None,
            [true, false] | [false, true] => {
                // Uncontended: the busy class takes the link; an idle class
                // keeps no credit (standard deficit round robin).
                let only = usize::from(busy[1]);
                self.deficit = [0; 2];
                self.turn = only;
                let frame = self.queues[weighted[only]].pop_front()?;
                Some(self.account(frame))
            }
            [true, true] => loop {
                let side = self.turn;
                let head = self.queues[weighted[side]].front()?.wire_len() as u64;
                if self.deficit[side] >= head {
                    self.deficit[side] -= head;
                    let frame = self.queues[weighted[side]].pop_front()?;
                    return Some(self.account(frame));
                }
                // Not enough credit: the other side's turn, with a fresh quantum.
                self.turn = 1 - side;
                self.deficit[self.turn] += self.quantum[self.turn];
            },
        }
    }

    fn account(&mut self, frame: Frame) -> Frame {
        self.queued_bytes[frame.class as usize] -= frame.wire_len() as u64;
        frame
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::FrameKind;

    fn frame(class: TrafficClass, id: u64, bytes: usize) -> Frame {
        Frame {
            class,
            kind: FrameKind::Request,
            service: 0,
            request_id: id,
            body: Bytes::new(),
            data: Bytes::from(vec![0; bytes]),
        }
    }

    #[test]
    fn control_always_goes_first() {
        let mut queues = ClassQueues::new(ClassWeights::default());
        for id in 0..10 {
            queues.push(frame(TrafficClass::Background, id, 1 << 20));
            queues.push(frame(TrafficClass::Foreground, id, 4096));
        }
        queues.push(frame(TrafficClass::Control, 100, 10));
        assert_eq!(
            queues.pop().map(|f| (f.class, f.request_id)),
            Some((TrafficClass::Control, 100))
        );
        queues.pop();
        queues.push(frame(TrafficClass::Control, 101, 10));
        assert_eq!(
            queues.pop().map(|f| f.class),
            Some(TrafficClass::Control),
            "a control frame queued later still overtakes waiting data"
        );
    }

    #[test]
    fn contended_link_is_shared_by_weight_in_bytes() {
        for (fg, bg) in [(4u32, 1u32), (1, 1), (1, 3)] {
            let mut queues = ClassQueues::new(ClassWeights {
                foreground: fg,
                background: bg,
            });
            // Foreground sends small frames, background large ones.
            for id in 0..20_000 {
                queues.push(frame(TrafficClass::Foreground, id, 4096));
            }
            for id in 0..2_000 {
                queues.push(frame(TrafficClass::Background, id, 128 << 10));
            }
            let mut sent = [0u64; 2];
            for _ in 0..4000 {
                let Some(f) = queues.pop() else { break };
                sent[f.class as usize - 1] += f.wire_len() as u64;
            }
            let share = sent[0] as f64 / (sent[0] + sent[1]) as f64;
            let expected = f64::from(fg) / f64::from(fg + bg);
            assert!(
                (share - expected).abs() < 0.05,
                "weights {fg}:{bg}: foreground got {share:.3} of the bytes, expected {expected:.3}"
            );
        }
    }

    #[test]
    fn a_lone_class_gets_the_whole_link_and_keeps_no_credit() {
        let mut queues = ClassQueues::new(ClassWeights::default());
        for id in 0..100 {
            queues.push(frame(TrafficClass::Background, id, 4096));
        }
        let mut order = Vec::new();
        while let Some(f) = queues.pop() {
            order.push(f.request_id);
        }
        assert_eq!(order, (0..100).collect::<Vec<_>>(), "FIFO within a class");
        assert!(queues.is_empty());
        assert_eq!(queues.queued_bytes(TrafficClass::Background), 0);
        // Background idled: when both are busy again, it starts without credit
        // and foreground still gets its share immediately.
        for id in 0..10 {
            queues.push(frame(TrafficClass::Background, id, 64 << 10));
            queues.push(frame(TrafficClass::Foreground, id, 4096));
        }
        let first_four: Vec<_> = (0..4)
            .filter_map(|_| queues.pop().map(|f| f.class))
            .collect();
        assert!(first_four.contains(&TrafficClass::Foreground));
    }
}
