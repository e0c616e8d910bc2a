//! A partition's messages waiting for its reader, in chunks of at most a batch.

use super::*;

/// Messages of one partition waiting for its reader, in chunks of at most a batch.
pub(super) struct PartitionBuffer {
    pub(super) info: Arc<PartitionInfo>,
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) chunk_size: usize,
    pub(super) queue: Mutex<Queue>,
    pub(super) ready: Notify,
    /// The partition was revoked or the source is closing: no more messages come.
    pub(super) closed: AtomicBool,
    pub(super) log_end: Arc<Watermarks>,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) chunks: VecDeque<Chunk>,
    pub(super) messages: usize,
    pub(super) bytes: usize,
    pub(super) paused: bool,
}

impl PartitionBuffer {
    pub(super) fn new(
        info: Arc<PartitionInfo>,
        topic: Arc<str>,
        partition: i32,
        chunk_size: usize,
    ) -> Self {
        PartitionBuffer {
            info,
            topic,
            partition,
            chunk_size,
            queue: Mutex::default(),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            log_end: Arc::new(Watermarks {
                low: AtomicI64::new(-1),
                high: AtomicI64::new(-1),
            }),
        }
    }

    /// Adds a message; true when the partition should be paused now.
    pub(super) fn push(&self, message: &BorrowedMessage<'_>) -> bool {
        let pause = {
            let mut q = self.queue.lock().expect("queue lock");
            if q.chunks.back().is_none_or(|c| c.len() >= self.chunk_size) {
                q.chunks.push_back(Chunk::default());
            }
            let chunk = q.chunks.back_mut().expect("a chunk");
            let bytes = chunk.push(message);
            q.messages += 1;
            q.bytes += bytes;
            let full = q.messages >= 4 * self.chunk_size || q.bytes >= MAX_BUFFERED_BYTES;
            let pause = full && !q.paused;
            q.paused |= pause;
            pause
        };
        self.ready.notify_one();
        pause
    }

    /// Up to `max` messages, oldest first; asks for a resume when a paused partition has
    /// room again.
    pub(super) fn take(&self, max: usize, shared: &GroupState) -> Option<Chunk> {
        let mut q = self.queue.lock().expect("queue lock");
        let front = q.chunks.front_mut()?;
        let chunk = if front.len() <= max {
            q.chunks.pop_front().expect("a chunk")
        } else {
            front.split_front(max)
        };
        q.messages -= chunk.len();
        q.bytes -= chunk.bytes();
        if q.paused && q.messages <= self.chunk_size && q.bytes < MAX_BUFFERED_BYTES / 2 {
            q.paused = false;
            shared
                .resume
                .lock()
                .expect("resume lock")
                .push((self.topic.clone(), self.partition));
        }
        Some(chunk)
    }
}

/// A header's name and value.
pub(super) type HeaderPair = sluice_engine::dead_letter::Header;

/// What a header takes in memory: its name and value, its pair, and their allocations'
/// rounding. Headers count in the buffer's bound like payloads: a message of a megabyte
/// can carry half a million empty headers, 32 bytes of pair each, and uncounted they let
/// the buffer hold tens of gigabytes before it paused the partition.
fn header_bytes((name, value): &HeaderPair) -> usize {
    name.len() + value.as_ref().map_or(0, |v| v.len()) + std::mem::size_of::<HeaderPair>() + 32
}

/// Messages stored column by column, as they will be decoded.
#[derive(Default)]
pub(super) struct Chunk {
    pub(super) payloads: Vec<u8>,
    pub(super) payload_ends: Vec<usize>,
    pub(super) offsets: Vec<i64>,
    /// Whether each message has a value (a null one is a tombstone; an empty one is not).
    pub(super) has_payload: Vec<bool>,
    pub(super) keys: Vec<u8>,
    pub(super) key_ends: Vec<usize>,
    pub(super) has_key: Vec<bool>,
    pub(super) timestamps: Vec<Option<i64>>,
    /// Headers of all messages, and where each message's headers end.
    pub(super) headers: Vec<HeaderPair>,
    pub(super) header_ends: Vec<usize>,
}

impl Chunk {
    pub(super) fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The memory the chunk's messages take, as the buffer's bound counts it: payloads,
    /// keys and headers.
    pub(super) fn bytes(&self) -> usize {
        self.payloads.len() + self.keys.len() + self.headers.iter().map(header_bytes).sum::<usize>()
    }

    /// Appends a message; returns the bytes it added.
    pub(super) fn push(&mut self, m: &BorrowedMessage<'_>) -> usize {
        let payload = m.payload().unwrap_or_default();
        self.payloads.extend_from_slice(payload);
        self.payload_ends.push(self.payloads.len());
        self.has_payload.push(m.payload().is_some());
        self.offsets.push(m.offset());
        let key = m.key();
        self.keys.extend_from_slice(key.unwrap_or_default());
        self.key_ends.push(self.keys.len());
        self.has_key.push(key.is_some());
        self.timestamps.push(m.timestamp().to_millis());
        let mut header_bytes = 0;
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                let pair = (
                    String::from_utf8_lossy(h.key.as_bytes()).into(),
                    h.value.map(Into::into),
                );
                header_bytes += self::header_bytes(&pair);
                self.headers.push(pair);
            }
        }
        self.header_ends.push(self.headers.len());
        payload.len() + key.map_or(0, <[u8]>::len) + header_bytes
    }

    pub(super) fn range(ends: &[usize], i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { ends[i - 1] };
        start..ends[i]
    }

    pub(super) fn payload(&self, i: usize) -> &[u8] {
        &self.payloads[Self::range(&self.payload_ends, i)]
    }

    pub(super) fn key(&self, i: usize) -> Option<&[u8]> {
        self.has_key[i].then(|| &self.keys[Self::range(&self.key_ends, i)])
    }

    /// The chunk without the messages at `drop` (ascending): metadata of the rows kept.
    pub(super) fn without(&self, drop: &[usize]) -> Chunk {
        let mut kept = Chunk::default();
        let mut skip = drop.iter().peekable();
        for i in 0..self.len() {
            if skip.peek() == Some(&&i) {
                skip.next();
                continue;
            }
            kept.payload_ends.push(0);
            kept.has_payload.push(self.has_payload[i]);
            kept.offsets.push(self.offsets[i]);
            let key = self.key(i);
            kept.keys.extend_from_slice(key.unwrap_or_default());
            kept.key_ends.push(kept.keys.len());
            kept.has_key.push(key.is_some());
            kept.timestamps.push(self.timestamps[i]);
            kept.headers
                .extend_from_slice(&self.headers[Self::range(&self.header_ends, i)]);
            kept.header_ends.push(kept.headers.len());
        }
        kept
    }

    /// Splits off the first `n` messages.
    pub(super) fn split_front(&mut self, n: usize) -> Chunk {
        fn split_ends(ends: &mut Vec<usize>, n: usize) -> (Vec<usize>, usize) {
            let cut = ends[n - 1];
            let front = ends.drain(..n).collect();
            for e in ends.iter_mut() {
                *e -= cut;
            }
            (front, cut)
        }
        let (payload_ends, cut) = split_ends(&mut self.payload_ends, n);
        let payloads = self.payloads.drain(..cut).collect();
        let (key_ends, cut) = split_ends(&mut self.key_ends, n);
        let keys = self.keys.drain(..cut).collect();
        let (header_ends, cut) = split_ends(&mut self.header_ends, n);
        let headers = self.headers.drain(..cut).collect();
        Chunk {
            payloads,
            payload_ends,
            has_payload: self.has_payload.drain(..n).collect(),
            offsets: self.offsets.drain(..n).collect(),
            keys,
            key_ends,
            has_key: self.has_key.drain(..n).collect(),
            timestamps: self.timestamps.drain(..n).collect(),
            headers,
            header_ends,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_count_in_the_buffers_bytes_and_follow_a_split() {
        let empty: HeaderPair = ("".into(), None);
        let mut chunk = Chunk::default();
        for (payload, headers) in [(&b"ab"[..], 100_000), (b"c", 0), (b"d", 2)] {
            chunk.payloads.extend_from_slice(payload);
            chunk.payload_ends.push(chunk.payloads.len());
            chunk.has_payload.push(true);
            chunk.offsets.push(chunk.offsets.len() as i64);
            chunk.key_ends.push(0);
            chunk.has_key.push(false);
            chunk.timestamps.push(None);
            chunk
                .headers
                .extend(std::iter::repeat_n(empty.clone(), headers));
            chunk.header_ends.push(chunk.headers.len());
        }
        let per_header = header_bytes(&empty);
        assert!(per_header >= std::mem::size_of::<HeaderPair>());
        assert_eq!(chunk.bytes(), 4 + 100_002 * per_header);
        // A message of 100,000 empty headers is over 3 MB as counted, not 2 bytes.
        let front = chunk.split_front(1);
        assert_eq!(front.bytes(), 2 + 100_000 * per_header);
        assert_eq!(chunk.bytes(), 2 + 2 * per_header);
    }
}
