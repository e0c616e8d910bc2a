//! The Nexmark model as the reference generators define it: which event an event number
//! is, the id spaces of people and auctions, hot sellers, auctions and bidders, prices,
//! auction lengths and the sizes of the text fields.
//!
//! Follows `GeneratorConfig`, `PersonGenerator`, `AuctionGenerator`, `BidGenerator`,
//! `PriceGenerator` and `StringsGenerator` of nexmark/nexmark (the Flink benchmark) and
//! Apache Beam. Where this differs, on purpose:
//! - Randomness is seeded per event from `(seed, event id)` (as Beam does), so an event is
//!   the same whatever the partitioning, batch size or restart; Flink's is unseeded.
//! - A bidder id gets the person id base once (Beam), not twice (Flink's +2000 slip), so
//!   bidders are person ids.
//! - Text fields have the reference's lengths and alphabets but their characters are a
//!   slice of a pool of random text made once from the seed: one draw per field instead of
//!   one per character (the reference's per-character draws would cost more than the
//!   queries being measured). Long ones are string views into the pool (no copy); a bid's
//!   channel and url are dictionary-encoded (10,004 of them).

use std::sync::Arc;

use arrow::array::builder::make_view;
use arrow::array::{ArrayRef, StringArray};
use arrow::buffer::Buffer;

/// Event kinds, as the `event_type` column has them.
pub const PERSON: i32 = 0;
pub const AUCTION: i32 = 1;
pub const BID: i32 = 2;

const PERSON_PROPORTION: i64 = 1;
const AUCTION_PROPORTION: i64 = 3;
/// Person + auction + bid (46) proportions.
const TOTAL_PROPORTION: i64 = 50;

pub const FIRST_PERSON_ID: i64 = 1000;
pub const FIRST_AUCTION_ID: i64 = 1000;
pub const FIRST_CATEGORY_ID: i64 = 10;
pub const NUM_CATEGORIES: u32 = 5;
/// How far past the newest person/auction a random id may reach (ids not made yet).
const PERSON_ID_LEAD: u64 = 10;
const AUCTION_ID_LEAD: u64 = 10;
/// Hot sellers, auctions and bidders are every 100th id.
const HOT_BATCH: i64 = 100;
/// One in `ratio` draws is not hot: sellers 1/4, auctions 1/2, bidders 1/4.
pub const HOT_SELLER_RATIO: u32 = 4;
pub const HOT_AUCTION_RATIO: u32 = 2;
pub const HOT_BIDDER_RATIO: u32 = 4;
const HOT_CHANNELS_RATIO: u32 = 2;
const CHANNELS: u32 = 10_000;
const MIN_STRING_LENGTH: u32 = 3;

pub const AVG_PERSON_BYTES: usize = 200;
pub const AVG_AUCTION_BYTES: usize = 500;
pub const AVG_BID_BYTES: usize = 100;

pub const FIRST_NAMES: [&str; 11] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
pub const LAST_NAMES: [&str; 9] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
pub const US_CITIES: [&str; 10] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
pub const US_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// Id of the newest person at event `id` (base 0).
pub fn last_base0_person_id(id: i64) -> i64 {
    let epoch = id / TOTAL_PROPORTION;
    let offset = (id % TOTAL_PROPORTION).min(PERSON_PROPORTION - 1);
    epoch * PERSON_PROPORTION + offset
}

/// Id of the newest auction at event `id` (base 0).
pub fn last_base0_auction_id(id: i64) -> i64 {
    let mut epoch = id / TOTAL_PROPORTION;
    let mut offset = id % TOTAL_PROPORTION;
    if offset < PERSON_PROPORTION {
        // A person: the last auction of the previous epoch.
        epoch -= 1;
        offset = AUCTION_PROPORTION - 1;
    } else if offset >= PERSON_PROPORTION + AUCTION_PROPORTION {
        // A bid: the last auction of this epoch.
        offset = AUCTION_PROPORTION - 1;
    } else {
        offset -= PERSON_PROPORTION;
    }
    epoch * AUCTION_PROPORTION + offset
}

/// A person among the `active` most recent ones, or a little past the newest (base 0).
pub fn next_base0_person_id(id: i64, rng: &mut fastrand::Rng, active: u64) -> i64 {
    let people = last_base0_person_id(id) + 1;
    let active = (people as u64).min(active);
    let n = rng.u64(..active + PERSON_ID_LEAD);
    people - active as i64 + n as i64
}

/// An auction among the `in_flight` most recent ones, or a little past the newest (base 0).
pub fn next_base0_auction_id(id: i64, rng: &mut fastrand::Rng, in_flight: u64) -> i64 {
    let max = last_base0_auction_id(id);
    let min = (max - in_flight as i64).max(0);
    min + rng.u64(..(max - min) as u64 + 1 + AUCTION_ID_LEAD) as i64
}

/// Hot seller/bidder: the newest person id rounded down to a multiple of 100.
pub fn hot_person(id: i64) -> i64 {
    (last_base0_person_id(id) / HOT_BATCH) * HOT_BATCH
}

/// Hot auction: the newest auction id rounded down to a multiple of 100.
pub fn hot_auction(id: i64) -> i64 {
    (last_base0_auction_id(id) / HOT_BATCH) * HOT_BATCH
}

/// A price in cents, log-uniform from $1 to $1,000,000.
pub fn next_price(rng: &mut fastrand::Rng) -> i64 {
    // 10^(6u) * 100, with exp rather than powf; rounded (the value is positive).
    ((rng.f64() * 6.0 * std::f64::consts::LN_10).exp() * 100.0 + 0.5) as i64
}

/// Length of an `extra` field that brings an event of `current` bytes to `average` ± 20%.
pub fn extra_length(rng: &mut fastrand::Rng, current: usize, average: usize) -> usize {
    if current > average {
        return 0;
    }
    let desired = average - current;
    let delta = (desired as f64 * 0.2).round() as usize;
    desired - delta
        + if delta == 0 {
            0
        } else {
            rng.usize(..2 * delta)
        }
}

/// The per-event random sequence: the same for an event id and seed wherever it is made.
pub fn event_rng(seed: u64, id: i64) -> fastrand::Rng {
    // SplitMix64's finaliser spreads neighbouring ids over the whole state space.
    let mut z = seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    fastrand::Rng::with_seed(z ^ (z >> 31))
}

/// Bytes of random text the fields are sliced from.
const POOL: usize = 1 << 16;
/// Longest field taken from a pool (an auction's `extra` is about 400 bytes).
const LONGEST: usize = 1024;

/// Where a field's text lies in a pool.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    at: u32,
    len: u32,
}

impl Slice {
    pub fn len(self) -> usize {
        self.len as usize
    }
}

/// Random text made once per source, which text fields are slices of (string views into
/// it, not copies), and the channels bids come from.
pub struct Text {
    /// Lower-case letters and one space in 13, as `nextString` draws them.
    words: Buffer,
    /// Lower-case letters, as `nextExactString` (the `extra` fields) draws them.
    letters: Buffer,
    /// Names and urls of the 10,000 channels, then the 4 hot ones: the dictionary values
    /// of a bid's `channel` and `url`.
    pub channels: ArrayRef,
    pub urls: ArrayRef,
}

impl Text {
    pub fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x6E65_786D_6172_6B21);
        let words: Vec<u8> = (0..POOL + LONGEST)
            .map(|_| word_char(&mut rng, b' '))
            .collect();
        let letters: Vec<u8> = (0..POOL + LONGEST).map(|_| b'a' + rng.u8(..26)).collect();
        let mut names = Vec::with_capacity(CHANNELS as usize + HOT_CHANNELS.len());
        let mut urls = Vec::with_capacity(names.capacity());
        for c in 0..CHANNELS {
            let mut url = base_url(&mut rng);
            if rng.u32(..10) > 0 {
                url.push_str(&format!(
                    "&channel_id={}",
                    (c as i32).reverse_bits().unsigned_abs()
                ));
            }
            names.push(format!("channel-{c}"));
            urls.push(url);
        }
        for c in HOT_CHANNELS {
            names.push(c.to_string());
            urls.push(base_url(&mut rng));
        }
        Text {
            words: Buffer::from_vec(words),
            letters: Buffer::from_vec(letters),
            channels: Arc::new(StringArray::from(names)),
            urls: Arc::new(StringArray::from(urls)),
        }
    }

    /// `nextString(maxLength)`: 3 to `max - 1` characters of words, trimmed.
    pub fn next_string(&self, rng: &mut fastrand::Rng, max: u32) -> Slice {
        let len = (MIN_STRING_LENGTH + rng.u32(..max - MIN_STRING_LENGTH)) as usize;
        let at = rng.usize(..POOL);
        let raw = &self.words[at..at + len];
        let start = raw.len() - raw.trim_ascii_start().len();
        let trimmed = raw.trim_ascii();
        Slice {
            at: (at + start) as u32,
            len: trimmed.len() as u32,
        }
    }

    /// `nextExtra`: `len` letters.
    pub fn letters(&self, rng: &mut fastrand::Rng, len: usize) -> Slice {
        Slice {
            at: rng.usize(..POOL) as u32,
            len: len.min(LONGEST) as u32,
        }
    }

    pub fn words_of(&self, s: Slice) -> &[u8] {
        &self.words[s.at as usize..(s.at + s.len) as usize]
    }

    /// A string view of a slice of `words` (the array's buffer 0 is [`Text::words`]).
    pub fn words_view(&self, s: Slice) -> u128 {
        make_view(self.words_of(s), 0, s.at)
    }

    /// A string view of a slice of `letters` (the array's buffer 0 is [`Text::letters`]).
    pub fn letters_view(&self, s: Slice) -> u128 {
        let bytes = &self.letters[s.at as usize..(s.at + s.len) as usize];
        make_view(bytes, 0, s.at)
    }

    pub fn words(&self) -> Buffer {
        self.words.clone()
    }

    pub fn letters_buffer(&self) -> Buffer {
        self.letters.clone()
    }

    /// A bid's channel (an index into [`Text::channels`] and [`Text::urls`]): one of the 4
    /// hot channels half the time, else one of 10,000.
    pub fn channel(&self, rng: &mut fastrand::Rng) -> i32 {
        if rng.u32(..HOT_CHANNELS_RATIO) > 0 {
            (CHANNELS + rng.u32(..HOT_CHANNELS.len() as u32)) as i32
        } else {
            rng.u32(..CHANNELS) as i32
        }
    }
}

fn word_char(rng: &mut fastrand::Rng, special: u8) -> u8 {
    if rng.u32(..13) == 0 {
        special
    } else {
        b'a' + rng.u8(..26)
    }
}

/// `https://www.nexmark.com/abc/de_f/ghi/item.htm?query=1`, as `getBaseUrl` makes it.
fn base_url(rng: &mut fastrand::Rng) -> String {
    let mut url = String::from("https://www.nexmark.com/");
    for _ in 0..3 {
        let len = MIN_STRING_LENGTH + rng.u32(..5 - MIN_STRING_LENGTH);
        url.extend((0..len).map(|_| word_char(rng, b'_') as char));
        url.push('/');
    }
    url.push_str("item.htm?query=1");
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_reference_arithmetic() {
        // Event ids 50, 100, … are people; 51..=53 auctions; 54..=99 bids.
        assert_eq!(last_base0_person_id(50), 1);
        assert_eq!(last_base0_person_id(53), 1);
        assert_eq!(last_base0_person_id(99), 1);
        assert_eq!(last_base0_person_id(100), 2);
        assert_eq!(last_base0_auction_id(2), 1);
        assert_eq!(last_base0_auction_id(3), 2);
        assert_eq!(last_base0_auction_id(4), 2);
        assert_eq!(last_base0_auction_id(50), 2);
        assert_eq!(last_base0_auction_id(51), 3);
        assert_eq!(last_base0_auction_id(60), 5);
        assert_eq!(
            hot_auction(60 * 50),
            100 * (last_base0_auction_id(60 * 50) / 100)
        );
    }

    #[test]
    fn random_ids_stay_among_the_recent_ones() {
        let mut rng = event_rng(1, 5000);
        for _ in 0..1000 {
            let p = next_base0_person_id(5000, &mut rng, 1000);
            assert!((0..=last_base0_person_id(5000) + 10).contains(&p));
            let a = next_base0_auction_id(5000, &mut rng, 100);
            let max = last_base0_auction_id(5000);
            assert!((max - 100..=max + 10).contains(&a), "{a} {max}");
        }
    }

    #[test]
    fn prices_and_sizes_have_the_reference_ranges() {
        let mut rng = event_rng(0, 1);
        for _ in 0..10_000 {
            assert!((100..=100_000_000).contains(&next_price(&mut rng)));
            assert!((54..=81).contains(&extra_length(&mut rng, 32, AVG_BID_BYTES)));
        }
        assert_eq!(extra_length(&mut rng, 300, 200), 0);
        let text = Text::new(0);
        for _ in 0..1000 {
            let s = text.words_of(text.next_string(&mut rng, 20));
            assert!(s.len() <= 19 && s.iter().all(|b| *b == b' ' || b.is_ascii_lowercase()));
            assert!(!s.starts_with(b" ") && !s.ends_with(b" "));
        }
        use arrow::array::AsArray;
        let c = text.channel(&mut rng) as usize;
        assert!(!text.channels.as_string::<i32>().value(c).is_empty());
        assert!(
            text.urls
                .as_string::<i32>()
                .value(c)
                .starts_with("https://www.nexmark.com/")
        );
    }
}
