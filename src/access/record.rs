//! One read record: fixed size, so the reading backend copies it into shared
//! memory without allocating there, and the worker copies it out again. Text
//! fields share one buffer; a field that does not fit is cut, and its bit in
//! `truncated` says so (the worker stores the cut as a visible marker).

use pgrx::pg_sys::Oid;

/// Bytes of one record in the queue (header and text together).
pub const RECORD_BYTES: usize = 4096;
/// Column numbers 1..=1664 (PostgreSQL's MaxTupleAttributeNumber) as a bitmap.
pub const COLUMN_BITS: usize = 1664;

/// What a record says.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A statement read a tracked table.
    Read = 1,
    /// `rows` read records of one backend were dropped (queue full) between
    /// `accessed_at` and `until`.
    Lost = 2,
}

/// How the reading statement ended.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Ok = 1,
    Error = 2,
    Denied = 3,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
        }
    }
}

/// The text fields, in buffer order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum Text {
    Schema,
    Table,
    Command,
    AccessedBy,
    DbUser,
    Role,
    SessionInfo,
    Statement,
    Parameters,
}
pub const NTEXT: usize = 9;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    pub kind: Kind,
    pub outcome: Outcome,
    /// Which text fields were cut to fit (bit i: field i).
    pub truncated: u16,
    pub db: Oid,
    pub relid: Oid,
    pub pid: i32,
    /// The SQLSTATE of an error, packed as PostgreSQL packs it (0: none).
    pub sqlstate: i32,
    /// Statement start (Lost: the first drop), PostgreSQL microseconds.
    pub accessed_at: i64,
    /// Lost: the last drop.
    pub until: i64,
    /// Rows the statement returned or processed (Lost: records dropped); -1: unknown.
    pub rows: i64,
    /// The top transaction id, 0 when the reader had none.
    pub txid: u64,
    pub query_id: i64,
    /// Whether `columns` is known (COPY of a whole table reads every column).
    pub has_columns: bool,
    pub columns: [u8; COLUMN_BITS / 8],
    pub lens: [u16; NTEXT],
}

/// The text buffer's size: what is left of a record after its header.
pub const TEXT_BYTES: usize = RECORD_BYTES - std::mem::size_of::<Header>();

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Record {
    pub h: Header,
    pub text: [u8; TEXT_BYTES],
}

const _: () = assert!(std::mem::size_of::<Record>() == RECORD_BYTES);

impl Record {
    pub fn new(kind: Kind) -> Box<Record> {
        Box::new(Record {
            h: Header {
                kind,
                outcome: Outcome::Ok,
                truncated: 0,
                db: pgrx::pg_sys::InvalidOid,
                relid: pgrx::pg_sys::InvalidOid,
                pid: 0,
                sqlstate: 0,
                accessed_at: 0,
                until: 0,
                rows: -1,
                txid: 0,
                query_id: 0,
                has_columns: false,
                columns: [0; COLUMN_BITS / 8],
                lens: [0; NTEXT],
            },
            text: [0; TEXT_BYTES],
        })
    }

    /// Sets the text fields, in order, each cut to what is left. The statement
    /// and the parameters come last, so only they are ever cut in practice.
    /// `clip(bytes, n)` is the longest prefix of at most n bytes that ends on a
    /// character boundary in the database encoding (pg_mbcliplen).
    pub fn set_texts(&mut self, fields: [&[u8]; NTEXT], clip: impl Fn(&[u8], usize) -> usize) {
        let mut at = 0usize;
        for (i, f) in fields.iter().enumerate() {
            let room = (TEXT_BYTES - at).min(u16::MAX as usize);
            let mut n = f.len();
            if n > room {
                n = clip(f, room).min(room);
                self.h.truncated |= 1 << i;
            }
            self.text[at..at + n].copy_from_slice(&f[..n]);
            self.h.lens[i] = n as u16;
            at += n;
        }
    }

    pub fn text(&self, which: Text) -> &[u8] {
        let i = which as usize;
        let start: usize = self.h.lens[..i].iter().map(|&l| l as usize).sum();
        &self.text[start..start + self.h.lens[i] as usize]
    }

    /// The bytes of this record in use: the header, then its texts (the rest of
    /// the buffer is never read). Queue copies move only these.
    pub fn used_bytes(&self) -> usize {
        let text: usize = self.h.lens.iter().map(|&l| l as usize).sum();
        (std::mem::offset_of!(Record, text) + text).min(RECORD_BYTES)
    }

    pub fn truncated(&self, which: Text) -> bool {
        self.h.truncated & (1 << which as usize) != 0
    }

    pub fn set_column(&mut self, attnum: i32) {
        if attnum >= 1 && (attnum as usize) <= COLUMN_BITS {
            let b = attnum as usize - 1;
            self.h.columns[b / 8] |= 1 << (b % 8);
        }
    }

    pub fn column_numbers(&self) -> impl Iterator<Item = i32> + '_ {
        (0..COLUMN_BITS)
            .filter(|b| self.h.columns[b / 8] & (1 << (b % 8)) != 0)
            .map(|b| b as i32 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip_and_long_ones_are_cut_on_a_character() {
        let mut r = Record::new(Kind::Read);
        let long = "é".repeat(TEXT_BYTES);
        let utf8 = |b: &[u8], mut n: usize| {
            while n > 0 && b[n] & 0xC0 == 0x80 {
                n -= 1;
            }
            n
        };
        let fields: [&[u8]; NTEXT] =
            [b"public", b"users", b"SELECT", b"alice", b"app", b"app", b"{}", long.as_bytes(), b""];
        r.set_texts(fields, utf8);
        assert_eq!(r.text(Text::Schema), b"public");
        assert_eq!(r.text(Text::Role), b"app");
        assert!(r.truncated(Text::Statement) && !r.truncated(Text::Table));
        assert!(std::str::from_utf8(r.text(Text::Statement)).is_ok());
        assert_eq!(r.text(Text::Parameters), b"");
        // A queue copy moves the header and exactly the texts' bytes; cut texts fill it.
        let texts: usize = fields.iter().take(NTEXT - 2).map(|f| f.len()).sum::<usize>()
            + r.text(Text::Statement).len();
        assert_eq!(r.used_bytes(), std::mem::offset_of!(Record, text) + texts);
        let mut short = Record::new(Kind::Read);
        short.set_texts([b"s", b"t", b"", b"", b"", b"", b"", b"", b""], |_, n| n);
        assert_eq!(short.used_bytes(), std::mem::offset_of!(Record, text) + 2);
        r.set_column(1);
        r.set_column(1664);
        r.set_column(1665); // beyond the limit: ignored
        assert_eq!(r.column_numbers().collect::<Vec<_>>(), vec![1, 1664]);
    }
}
