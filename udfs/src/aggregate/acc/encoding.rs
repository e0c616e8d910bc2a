//! Storage: a compact byte encoding of a list of accumulators (entries and sessions in
//! the state database).

use super::*;

pub fn encode(accs: &[Acc], out: &mut Vec<u8>) {
    for acc in accs {
        match acc {
            Acc::Count(n) => {
                out.push(0);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Acc::SumInt(s) => {
                out.push(1);
                put_opt(out, s.map(|x| x.to_le_bytes()));
            }
            Acc::SumFloat(s) => {
                out.push(2);
                put_opt(out, s.map(|x| x.to_le_bytes()));
            }
            Acc::Min(v) => {
                out.push(3);
                put_value(out, v);
            }
            Acc::Max(v) => {
                out.push(4);
                put_value(out, v);
            }
            Acc::Avg { sum, count } => {
                out.push(5);
                out.extend_from_slice(&sum.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Acc::Distinct(set) => {
                out.push(6);
                out.extend_from_slice(&(set.len() as u32).to_le_bytes());
                for v in set.iter() {
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    out.extend_from_slice(v);
                }
            }
            Acc::Approx(hll) => {
                out.push(7);
                out.extend_from_slice(&hll.registers);
            }
            Acc::First(p) | Acc::Last(p) => {
                out.push(if matches!(acc, Acc::First(..)) { 8 } else { 9 });
                put_order(out, &p.0);
                put_value(out, &p.1);
            }
            Acc::MaxBy(p) | Acc::MinBy(p) => {
                out.push(if matches!(acc, Acc::MaxBy(..)) {
                    10
                } else {
                    11
                });
                put_value(out, &p.by);
                put_order(out, &p.at);
                put_value(out, &p.value);
            }
        }
    }
}

fn put_order(out: &mut Vec<u8>, at: &Order) {
    out.extend_from_slice(&at.time.to_le_bytes());
    out.extend_from_slice(&at.partition.to_le_bytes());
    out.extend_from_slice(&at.seq.to_le_bytes());
}

fn put_opt(out: &mut Vec<u8>, v: Option<[u8; 8]>) {
    match v {
        Some(bytes) => {
            out.push(1);
            out.extend_from_slice(&bytes);
        }
        None => out.push(0),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(0),
        Value::Int(x) => {
            out.push(1);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Float(x) => {
            out.push(2);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Text(t) => {
            out.push(3);
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t.as_bytes());
        }
    }
}

/// Reads what [`encode`] wrote: exactly `count` accumulators.
pub fn decode(bytes: &[u8], count: usize) -> Result<(Vec<Acc>, &[u8])> {
    let mut r = Reader(bytes);
    let mut accs = Vec::with_capacity(count);
    for _ in 0..count {
        accs.push(
            r.acc()
                .ok_or_else(|| Error::Internal("corrupt aggregate state".into()))?,
        );
    }
    Ok((accs, r.0))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn b8(&mut self) -> Option<[u8; 8]> {
        self.take(8).map(|b| b.try_into().expect("8 bytes"))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn opt(&mut self) -> Option<Option<[u8; 8]>> {
        match self.u8()? {
            0 => Some(None),
            _ => self.b8().map(Some),
        }
    }
    fn value(&mut self) -> Option<Value> {
        Some(match self.u8()? {
            0 => Value::Null,
            1 => Value::Int(i64::from_le_bytes(self.b8()?)),
            2 => Value::Float(f64::from_le_bytes(self.b8()?)),
            3 => {
                let n = self.u32()? as usize;
                Value::Text(std::str::from_utf8(self.take(n)?).ok()?.into())
            }
            _ => return None,
        })
    }
    fn order(&mut self) -> Option<Order> {
        Some(Order {
            time: i64::from_le_bytes(self.b8()?),
            partition: self.u32()?,
            seq: u64::from_le_bytes(self.b8()?),
        })
    }
    fn acc(&mut self) -> Option<Acc> {
        Some(match self.u8()? {
            0 => Acc::Count(i64::from_le_bytes(self.b8()?)),
            1 => Acc::SumInt(self.opt()?.map(i64::from_le_bytes)),
            2 => Acc::SumFloat(self.opt()?.map(f64::from_le_bytes)),
            3 => Acc::Min(self.value()?),
            4 => Acc::Max(self.value()?),
            5 => Acc::Avg {
                sum: f64::from_le_bytes(self.b8()?),
                count: i64::from_le_bytes(self.b8()?),
            },
            6 => {
                let n = self.u32()? as usize;
                let mut set = HashSet::with_capacity(n);
                for _ in 0..n {
                    let len = self.u32()? as usize;
                    set.insert(self.take(len)?.into());
                }
                Acc::Distinct(Box::new(set))
            }
            7 => Acc::Approx(Box::new(Hll {
                registers: self.take(HLL_REGISTERS)?.into(),
            })),
            tag @ (8 | 9) => {
                let at = self.order()?;
                let v = self.value()?;
                if tag == 8 {
                    Acc::First(Box::new((at, v)))
                } else {
                    Acc::Last(Box::new((at, v)))
                }
            }
            tag @ (10 | 11) => {
                let b = self.value()?;
                let pick = Box::new(Pick {
                    by: b,
                    at: self.order()?,
                    value: self.value()?,
                });
                if tag == 10 {
                    Acc::MaxBy(pick)
                } else {
                    Acc::MinBy(pick)
                }
            }
            _ => return None,
        })
    }
}
