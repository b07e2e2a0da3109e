//! The JSON log line, written straight into the line buffer.
//!
//! Produces what `tracing_subscriber::fmt().json().flatten_event(true)` does
//! (`{"timestamp":…,"level":"INFO",<fields in order>,"target":…}`, numbers as
//! serde_json writes them, everything else a JSON string), at a fraction of its
//! cost: that formatter goes through serde's map serializer for every field
//! and `fmt` for the timestamp, which made the access log line cost as many
//! instructions as nginx spends on a whole proxied request. The sidecar opens
//! no spans, so no span fields are written.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of `log.format = "json"`.
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is built in a reused buffer with inlined appends, then
        // handed over in one call: a dynamic call per piece cost more than
        // the pieces. Taken out of the cell, so a `Debug` that logs is safe.
        let mut line = LINE.take();
        line.clear();
        let result = format_line(&mut line, event);
        let written = result.and_then(|()| writer.write_str(&line));
        if line.capacity() <= 64 * 1024 {
            LINE.set(line);
        }
        written
    }
}

thread_local! {
    static LINE: Cell<String> = const { Cell::new(String::new()) };
}

fn format_line(line: &mut String, event: &Event<'_>) -> fmt::Result {
    let meta = event.metadata();
    let mut ts = [0u8; TIMESTAMP_LEN];
    timestamp(SystemTime::now(), &mut ts);
    line.push_str("{\"timestamp\":\"");
    // Only ASCII digits and punctuation were written into `ts`.
    line.push_str(std::str::from_utf8(&ts).map_err(|_| fmt::Error)?);
    line.push_str("\",\"level\":\"");
    line.push_str(meta.level().as_str());
    line.push('"');
    let mut fields = Fields {
        out: line,
        result: Ok(()),
        // Our own events name their fields with Rust identifiers; another
        // crate's could use any string literal.
        plain_names: meta.target().starts_with("token_sidecar"),
    };
    event.record(&mut fields);
    fields.result?;
    line.push_str(",\"target\":");
    write_escaped(line, meta.target())?;
    line.push_str("}\n");
    Ok(())
}

/// Writes each field as `,"name":value`.
struct Fields<'a> {
    out: &'a mut String,
    result: fmt::Result,
    /// The field names need no escaping (checking costs a scan of each
    /// name, on every line: a tenth of the CPU of a proxied request).
    plain_names: bool,
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.out.push(',');
        if self.plain_names {
            self.out.push('"');
            self.out.push_str(field.name());
            self.out.push('"');
        } else if let Err(e) = write_escaped(self.out, field.name()) {
            self.result = Err(e);
            return;
        }
        self.out.push(':');
        self.result = value(self.out);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| write_escaped(w, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| {
            w.push_str(if value { "true" } else { "false" });
            Ok(())
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| {
            w.push_str(itoa::Buffer::new().format(value));
            Ok(())
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| {
            w.push_str(itoa::Buffer::new().format(value));
            Ok(())
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json: shortest round-trip form, `null` when not finite.
        let value = super::fields::round_timing(field.name(), value);
        self.put(field, |w| {
            if value.is_finite() {
                w.push_str(ryu::Buffer::new().format_finite(value));
            } else {
                w.push_str("null");
            }
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| {
            w.push('"');
            write!(Escaper(&mut *w), "{value:?}")?;
            w.push('"');
            Ok(())
        });
    }
}

/// Bytes that JSON strings escape: `"`, `\\` and the C0 controls.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Escapes what passes through it as the inside of a JSON string.
struct Escaper<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        // Most strings need no escaping: one scan, one write.
        if !bytes.iter().any(|&b| NEEDS_ESCAPE[b as usize]) {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            // Slicing at `i` is safe: `b` is ASCII, so `i` is a char boundary.
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

fn write_escaped(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaper(w).write_str(s)?;
    w.write_char('"')
}

/// `2024-05-01T12:00:00.123456Z`.
const TIMESTAMP_LEN: usize = 27;

thread_local! {
    /// The last second formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`:
    /// the date arithmetic runs once a second, not once a line.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// RFC 3339 UTC with microseconds, as tracing-subscriber writes it. Times
/// before 1970 or after 9999 are written as 1970 and 9999 respectively.
fn timestamp(now: SystemTime, out: &mut [u8; TIMESTAMP_LEN]) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs().min(253_402_300_799); // 9999-12-31T23:59:59
    let head = SECOND.with(|cell| {
        let (cached, head) = cell.get();
        if cached == secs {
            return head;
        }
        let head = date_time(secs);
        cell.set((secs, head));
        head
    });
    out[..19].copy_from_slice(&head);
    out[19] = b'.';
    digits(&mut out[20..26], since.subsec_micros());
    out[26] = b'Z';
}

/// `YYYY-MM-DDTHH:MM:SS` of Unix time `secs` (civil-from-days, H. Hinnant).
fn date_time(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    let mut s = *b"0000-00-00T00:00:00";
    digits(&mut s[0..4], year);
    digits(&mut s[5..7], month);
    digits(&mut s[8..10], day);
    digits(&mut s[11..13], rem / 3600);
    digits(&mut s[14..16], rem / 60 % 60);
    digits(&mut s[17..19], rem % 60);
    s
}

/// `n` in decimal, zero-padded to fill `out`.
fn digits(out: &mut [u8], mut n: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Events with every kind of field and awkward strings.
    fn emit() {
        let e = io::Error::other("bad \"thing\"\n");
        tracing::info!(target: "token_sidecar::access", method = %http::Method::POST,
            path = "/a\"b\\c\u{1}é", status = 200u16, total_ms = 1.25f64, upstream_ms = 0.0f64,
            bytes_in = 5u64, neg = -3i64, big = u128::MAX, replayed = false, nan = f64::NAN,
            "request");
        tracing::warn!(error = %e, debug = ?Some("x\ty"), "tab\there");
        tracing::error!("{} formatted {:?}", 1, "two");
    }

    #[test]
    fn same_json_as_tracing_subscriber() {
        let ours = Buf::default();
        let theirs = Buf::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .event_format(JsonFormat)
                .with_writer(ours.clone())
                .finish(),
            emit,
        );
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(theirs.clone())
                .finish(),
            emit,
        );
        let (ours, theirs) = (ours.lines(), theirs.lines());
        assert_eq!(ours.len(), 3);
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            // Equal but for the timestamp, byte for byte.
            let strip = |l: &str| l[TIMESTAMP_LEN + 16..].to_owned();
            assert_eq!(strip(a), strip(b));
            let v: serde_json::Value = serde_json::from_str(a).unwrap();
            assert_eq!(v["timestamp"].as_str().unwrap().len(), TIMESTAMP_LEN);
        }
    }

    #[test]
    fn both_formats_write_timings_rounded_to_the_microsecond() {
        let emit = || {
            tracing::info!(
                total_ms = 1.054_355_000_000_000_2f64,
                upstream_ms = 43.352_402_999_999_995f64,
                count = 3u64,
                "request"
            );
        };
        let text = Buf::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .fmt_fields(super::super::fields::RoundedFields)
                .with_ansi(false)
                .with_writer(text.clone())
                .finish(),
            emit,
        );
        let line = &text.lines()[0];
        assert!(
            line.contains("request total_ms=1.054 upstream_ms=43.352 count=3"),
            "{line}"
        );
        let json = Buf::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .event_format(JsonFormat)
                .with_writer(json.clone())
                .finish(),
            emit,
        );
        let line = &json.lines()[0];
        assert!(
            line.contains(r#""total_ms":1.054,"upstream_ms":43.352,"count":3"#),
            "{line}"
        );
    }

    /// Slow and obviously right: count whole years, then whole months.
    fn reference(secs: u64) -> String {
        let mut days = secs / 86_400;
        let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut year = 1970;
        while days >= if leap(year) { 366 } else { 365 } {
            days -= if leap(year) { 366 } else { 365 };
            year += 1;
        }
        let lengths = [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        let mut month = 0;
        while days >= lengths[month] {
            days -= lengths[month];
            month += 1;
        }
        let rem = secs % 86_400;
        format!(
            "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            month + 1,
            days + 1,
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        )
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let t = UNIX_EPOCH + Duration::from_secs(1_714_564_800) + Duration::from_micros(7);
        let mut out = [0u8; TIMESTAMP_LEN];
        timestamp(t, &mut out);
        assert_eq!(&out, b"2024-05-01T12:00:00.000007Z");
        timestamp(t + Duration::from_micros(999_992), &mut out);
        assert_eq!(&out, b"2024-05-01T12:00:00.999999Z");
        timestamp(t + Duration::from_secs(1), &mut out);
        assert_eq!(&out, b"2024-05-01T12:00:01.000007Z");
        timestamp(UNIX_EPOCH - Duration::from_secs(5), &mut out);
        assert_eq!(&out, b"1970-01-01T00:00:00.000000Z");

        let mut secs = 0u64;
        while secs <= 253_402_300_799 {
            assert_eq!(
                std::str::from_utf8(&date_time(secs)).unwrap(),
                reference(secs),
                "{secs}"
            );
            secs += 86_400 * 97 + 3_599; // walks through leap days and every hour
        }
        for edge in [951_782_400, 1_709_164_799, 4_102_444_800, 253_402_300_799] {
            assert_eq!(
                std::str::from_utf8(&date_time(edge)).unwrap(),
                reference(edge)
            );
        }
    }
}
