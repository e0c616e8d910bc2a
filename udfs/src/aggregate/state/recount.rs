//! Each partition's memory as counted, counted again from what it holds (tests). The count
//! is kept by differences as the state changes, so a change left out of it (a table made
//! larger than empty before its first entry, say) drifts without any other sign.

use super::*;

impl AggregateState {
    /// Panics where a partition's count differs from a recount of what it holds.
    pub(crate) fn check_memory(&self) {
        for (name, part) in self.parts.read().expect("parts lock").iter() {
            let st = part.state.lock().expect("partition lock");
            assert_eq!(st.mem, st.recount(), "memory counted by partition {name}");
        }
    }
}

impl PartState {
    fn recount(&self) -> usize {
        let windows: usize = self
            .windows
            .values()
            .map(|w| {
                w.filter.size() + w.entries.recount() + w.order.as_ref().map_or(0, KeyOrder::bytes)
            })
            .sum();
        windows + self.sessions.recount()
    }
}
