use crate::chunk::chunk_payload_data::ChunkPayloadData;
use crate::chunk::chunk_selective_ack::GapAckBlock;
use crate::util::*;

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// Rallypoint patch: the chunks are kept in one deque in TSN order (serial number arithmetic,
/// RFC 1982), at most one per TSN, where upstream kept a `HashMap` by TSN beside a deque of the
/// sorted TSNs, and sorted that deque again on every push. A game's association holds one or
/// two chunks in flight and finds them by TSN on every SACK: an index or a short binary search
/// here, where the map hashed with SipHash and touched two allocations.
#[derive(Default, Debug)]
pub(crate) struct PayloadQueue {
    chunks: VecDeque<ChunkPayloadData>,
    dup_tsn: Vec<u32>,
    n_bytes: usize,
}

impl PayloadQueue {
    pub(crate) fn new() -> Self {
        PayloadQueue::default()
    }

    /// Where the chunk of `tsn` is (`Ok`), or where it would go (`Err`).
    fn position(&self, tsn: u32) -> Result<usize, usize> {
        // TSNs in flight are usually consecutive: then the offset from the front is the index.
        if let Some(front) = self.chunks.front() {
            let offset = tsn.wrapping_sub(front.tsn) as usize;
            if self.chunks.get(offset).is_some_and(|c| c.tsn == tsn) {
                return Ok(offset);
            }
        }
        self.chunks.binary_search_by(|c| {
            if c.tsn == tsn {
                core::cmp::Ordering::Equal
            } else if sna32lt(c.tsn, tsn) {
                core::cmp::Ordering::Less
            } else {
                core::cmp::Ordering::Greater
            }
        })
    }

    /// The chunks, in TSN order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &ChunkPayloadData> {
        self.chunks.iter()
    }

    pub(crate) fn can_push(&self, p: &ChunkPayloadData, cumulative_tsn: u32) -> bool {
        !(self.position(p.tsn).is_ok() || sna32lte(p.tsn, cumulative_tsn))
    }

    /// Adds a chunk; one already queued under the same TSN is replaced.
    pub(crate) fn push_no_check(&mut self, p: ChunkPayloadData) {
        self.n_bytes += p.user_data.len();
        if self.chunks.back().is_none_or(|last| sna32lt(last.tsn, p.tsn)) {
            self.chunks.push_back(p);
            return;
        }
        match self.position(p.tsn) {
            Ok(i) => {
                let old = core::mem::replace(&mut self.chunks[i], p);
                self.n_bytes = self.n_bytes.saturating_sub(old.user_data.len());
            }
            Err(i) => self.chunks.insert(i, p),
        }
    }

    /// push pushes a payload data. If the payload data is already in our queue or
    /// older than our cumulative_tsn marker, it will be recored as duplications,
    /// which can later be retrieved using popDuplicates.
    pub(crate) fn push(&mut self, p: ChunkPayloadData, cumulative_tsn: u32) -> bool {
        if !self.can_push(&p, cumulative_tsn) {
            // Found the packet, log in dups
            self.dup_tsn.push(p.tsn);
            return false;
        }
        self.push_no_check(p);
        true
    }

    /// pop pops only if the oldest chunk's TSN matches the given TSN.
    pub(crate) fn pop(&mut self, tsn: u32) -> Option<ChunkPayloadData> {
        if self.chunks.front()?.tsn != tsn {
            return None;
        }
        let c = self.chunks.pop_front()?;
        self.n_bytes = self.n_bytes.saturating_sub(c.user_data.len());
        Some(c)
    }

    /// Removes every queued chunk with a TSN at or before `cumulative_tsn`.
    ///
    /// Used when a FORWARD-TSN moves the cumulative TSN point past chunks the
    /// peer abandoned. The cost is proportional to the number of queued chunks,
    /// not to the size of the TSN jump: `cumulative_tsn` comes off the wire and
    /// may be up to 2^31 ahead of the current point.
    pub(crate) fn pop_up_to(&mut self, cumulative_tsn: u32) {
        while self.chunks.front().is_some_and(|c| sna32lte(c.tsn, cumulative_tsn)) {
            if let Some(c) = self.chunks.pop_front() {
                self.n_bytes = self.n_bytes.saturating_sub(c.user_data.len());
            }
        }
    }

    /// get returns reference to chunkPayloadData with the given TSN value.
    pub(crate) fn get(&self, tsn: u32) -> Option<&ChunkPayloadData> {
        self.position(tsn).ok().map(|i| &self.chunks[i])
    }

    pub(crate) fn get_mut(&mut self, tsn: u32) -> Option<&mut ChunkPayloadData> {
        self.position(tsn).ok().map(|i| &mut self.chunks[i])
    }

    /// Abandon siblings by identity, including nonconsecutive TSNs.
    pub(crate) fn abandon_message(&mut self, message_id: u64) -> usize {
        let mut released = 0;
        for chunk in &mut self.chunks {
            if chunk.message_id == message_id {
                released += chunk.user_data.len();
                chunk.user_data.clear();
                chunk.abandoned = true;
                chunk.retransmit = false;
            }
        }
        self.n_bytes -= released;
        released
    }

    pub(crate) fn mark_all_to_retransmit(&mut self) {
        for chunk in &mut self.chunks {
            if !chunk.acked && !chunk.abandoned {
                chunk.retransmit = true;
            }
        }
    }

    /// popDuplicates returns an array of TSN values that were found duplicate.
    pub(crate) fn pop_duplicates(&mut self) -> Vec<u32> {
        core::mem::take(&mut self.dup_tsn)
    }

    /// Gap offsets are nonzero u16 distances, not wrapping sequence numbers.
    /// Farther TSNs remain queued for reporting once the cumulative TSN advances.
    pub(crate) fn get_gap_ack_blocks(&self, cumulative_tsn: u32) -> Vec<GapAckBlock> {
        let mut gap_ack_blocks: Vec<GapAckBlock> = vec![];
        for tsn in self.chunks.iter().map(|c| c.tsn) {
            let Ok(offset) = u16::try_from(tsn.wrapping_sub(cumulative_tsn)) else {
                continue;
            };
            if offset == 0 {
                continue;
            }

            match gap_ack_blocks.last_mut() {
                Some(block) if block.end.checked_add(1) == Some(offset) => block.end = offset,
                _ => gap_ack_blocks.push(GapAckBlock {
                    start: offset,
                    end: offset,
                }),
            }
        }

        gap_ack_blocks
    }

    pub(crate) fn get_gap_ack_blocks_string(&self, cumulative_tsn: u32) -> String {
        let mut s = format!("cumTSN={}", cumulative_tsn);
        for b in self.get_gap_ack_blocks(cumulative_tsn) {
            s += format!(",{}-{}", b.start, b.end).as_str();
        }
        s
    }

    pub(crate) fn mark_as_acked(&mut self, tsn: u32) -> usize {
        let Some(c) = self.get_mut(tsn) else {
            return 0;
        };
        c.acked = true;
        c.retransmit = false;
        let n = c.user_data.len();
        c.user_data.clear();
        self.n_bytes -= n;
        n
    }

    pub(crate) fn get_last_tsn_received(&self) -> Option<&u32> {
        self.chunks.back().map(|c| &c.tsn)
    }

    pub(crate) fn get_num_bytes(&self) -> usize {
        self.n_bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.chunks.len()
    }

    pub(crate) fn contains_stream(&self, stream_identifier: u16) -> bool {
        self.chunks
            .iter()
            .any(|chunk| chunk.stream_identifier == stream_identifier)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
