//! The YAML that Go's `gopkg.in/yaml.v3` `Marshal` writes for a value
//! decoded from YAML, byte for byte, for the compose-app service hash.
//!
//! composectl labels every service of a published app with
//! `io.compose-spec.config-hash`: the sha256 of `yaml.Marshal(service)`,
//! where `service` is the service's map as decoded from the compose file
//! (image pinned, `build` removed). Its `ps`, and aktualizr-lite's check
//! that an app runs, match containers to the app by that label. To give the
//! same value, stowage writes the same bytes: block style with an
//! indentation of 4 (a sequence's items 2 further in when nested in another
//! sequence), map keys in yaml.v3's "natural" order (runs of digits compared
//! as numbers), scalars quoted exactly when yaml.v3 quotes them (a string
//! that would read back as another type, or as a YAML 1.1 boolean, is
//! double-quoted; one a plain scalar cannot hold is single-quoted, or
//! double-quoted when it holds a tab or a character YAML cannot print),
//! strings with a line break as literal blocks with yaml.v3's chomping and
//! indentation hints, numbers as Go's `strconv.FormatFloat(f, 'g', -1, 64)`,
//! no line folding. Written by hand because no Rust YAML crate writes
//! yaml.v3's layout; the rules are those of yaml.v3's `encode.go`,
//! `emitterc.go`, `resolve.go` and `sorter.go` (read, not copied), and the
//! unit tests hold hashes that yaml.v3 itself produced for the same input.
//!
//! Known differences, none of which a compose file normally holds: yaml.v3
//! decodes a mapping key that looks like a number (`80:`) as a number and
//! writes it unquoted (here every key is a string), and a YAML 1.1 octal
//! (`0777`) or a timestamp the decoder turns into another type.

use std::cmp::Ordering;

use serde_json::Value;

/// The bytes `yaml.Marshal(value)` gives.
pub fn marshal(value: &Value) -> String {
    let mut e = Emitter {
        out: String::new(),
        column: 0,
        indent: -1,
        indents: Vec::new(),
        whitespace: true,
        indention: true,
    };
    e.node(value, Parent::Root);
    if e.column != 0 {
        e.put_break();
    }
    e.out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Parent {
    Root,
    SeqItem,
    MapKey,
    MapValue,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

struct Emitter {
    out: String,
    column: usize,
    indent: i64,
    indents: Vec<i64>,
    whitespace: bool,
    indention: bool,
}

impl Emitter {
    fn put(&mut self, c: char) {
        self.out.push(c);
        self.column += 1;
    }

    fn put_break(&mut self) {
        self.out.push('\n');
        self.column = 0;
        self.indention = true;
    }

    fn write_indent(&mut self) {
        let indent = self.indent.max(0) as usize;
        if !self.indention || self.column > indent || (self.column == indent && !self.whitespace) {
            self.put_break();
        }
        while self.column < indent {
            self.put(' ');
        }
        self.whitespace = true;
    }

    fn write_indicator(&mut self, s: &str, need_whitespace: bool, is_indention: bool) {
        if need_whitespace && !self.whitespace {
            self.put(' ');
        }
        for c in s.chars() {
            self.put(c);
        }
        self.whitespace = false;
        self.indention = self.indention && is_indention;
    }

    /// yaml.v3's `increase_indent`: the first indentation inside a sequence
    /// item skips the "- "; everything else aligns to multiples of 4.
    fn increase_indent(&mut self, flow: bool, parent: Parent) {
        self.indents.push(self.indent);
        if self.indent < 0 {
            self.indent = if flow { 4 } else { 0 };
        } else if parent == Parent::SeqItem {
            self.indent += 2;
        } else {
            self.indent = 4 * ((self.indent + 4) / 4);
        }
    }

    fn pop_indent(&mut self) {
        self.indent = self.indents.pop().unwrap_or(-1);
    }

    fn node(&mut self, value: &Value, parent: Parent) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                self.increase_indent(false, parent);
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_by(|a, b| natural_cmp(a, b));
                for key in keys {
                    self.write_indent();
                    self.string(key, Parent::MapKey);
                    self.write_indicator(":", false, false);
                    self.node(&map[key.as_str()], Parent::MapValue);
                }
                self.pop_indent();
            }
            Value::Array(items) if !items.is_empty() => {
                self.increase_indent(false, parent);
                for item in items {
                    self.write_indent();
                    self.write_indicator("-", true, true);
                    self.node(item, Parent::SeqItem);
                }
                self.pop_indent();
            }
            Value::Object(_) => self.write_indicator("{}", true, false),
            Value::Array(_) => self.write_indicator("[]", true, false),
            Value::Null => self.scalar("null", Style::Plain, parent),
            Value::Bool(b) => self.scalar(if *b { "true" } else { "false" }, Style::Plain, parent),
            Value::Number(n) => {
                let text = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => i.to_string(),
                    (None, Some(u), _) => u.to_string(),
                    (None, None, Some(f)) => go_float(f),
                    _ => n.to_string(),
                };
                self.scalar(&text, Style::Plain, parent)
            }
            Value::String(s) => self.string(s, parent),
        }
    }

    /// encode.go's `stringv`: the requested style.
    fn string(&mut self, s: &str, parent: Parent) {
        let style = if s.contains('\n') {
            Style::Literal
        } else if resolves_to_string(s) && !is_base60_float(s) && !is_old_bool(s) {
            Style::Plain
        } else {
            Style::Double
        };
        self.scalar(s, style, parent)
    }

    fn scalar(&mut self, value: &str, requested: Style, parent: Parent) {
        let a = analyze(value);
        let simple_key = parent == Parent::MapKey;
        let mut style = requested;
        if simple_key && a.multiline {
            style = Style::Double;
        }
        if style == Style::Plain && (!a.block_plain_allowed || (value.is_empty() && simple_key)) {
            style = Style::Single;
        }
        if style == Style::Single && !a.single_quoted_allowed {
            style = Style::Double;
        }
        if style == Style::Literal && (!a.block_allowed || simple_key) {
            style = Style::Double;
        }
        self.increase_indent(true, parent);
        match style {
            Style::Plain => self.plain(value),
            Style::Single => self.single(value),
            Style::Double => self.double(value),
            Style::Literal => self.literal(value),
        }
        self.pop_indent();
    }

    fn plain(&mut self, value: &str) {
        if !value.is_empty() && !self.whitespace {
            self.put(' ');
        }
        let mut breaks = false;
        for c in value.chars() {
            if c == ' ' {
                self.put(c);
            } else if is_break(c) {
                if !breaks && c == '\n' {
                    self.put_break();
                }
                self.write_break(c);
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                self.put(c);
                self.indention = false;
                breaks = false;
            }
        }
        if !value.is_empty() {
            self.whitespace = false;
        }
        self.indention = false;
    }

    fn write_break(&mut self, c: char) {
        if c == '\n' {
            self.put_break();
        } else {
            self.out.push(c);
            self.column = 0;
            self.indention = true;
        }
    }

    fn single(&mut self, value: &str) {
        self.write_indicator("'", true, false);
        let mut breaks = false;
        for c in value.chars() {
            if c == ' ' {
                self.put(c);
            } else if is_break(c) {
                if !breaks && c == '\n' {
                    self.put_break();
                }
                self.write_break(c);
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                if c == '\'' {
                    self.put('\'');
                }
                self.put(c);
                self.indention = false;
                breaks = false;
            }
        }
        self.write_indicator("'", false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn double(&mut self, value: &str) {
        self.write_indicator("\"", true, false);
        let bom = value.starts_with('\u{feff}');
        for c in value.chars() {
            if !is_printable(c) || bom || is_break(c) || c == '"' || c == '\\' {
                self.put('\\');
                let v = c as u32;
                let escape = match v {
                    0x00 => Some('0'),
                    0x07 => Some('a'),
                    0x08 => Some('b'),
                    0x09 => Some('t'),
                    0x0A => Some('n'),
                    0x0B => Some('v'),
                    0x0C => Some('f'),
                    0x0D => Some('r'),
                    0x1B => Some('e'),
                    0x22 => Some('"'),
                    0x5C => Some('\\'),
                    0x85 => Some('N'),
                    0xA0 => Some('_'),
                    0x2028 => Some('L'),
                    0x2029 => Some('P'),
                    _ => None,
                };
                match escape {
                    Some(e) => self.put(e),
                    None => {
                        let (letter, width) = if v <= 0xFF {
                            ('x', 2)
                        } else if v <= 0xFFFF {
                            ('u', 4)
                        } else {
                            ('U', 8)
                        };
                        self.put(letter);
                        for d in format!("{v:0width$X}").chars() {
                            self.put(d);
                        }
                    }
                }
            } else {
                self.put(c);
            }
        }
        self.write_indicator("\"", false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn literal(&mut self, value: &str) {
        self.write_indicator("|", true, false);
        // Block scalar hints: the indentation when the text starts with a
        // space or a break, then the chomping.
        let first = value.chars().next();
        if first.is_some_and(|c| c == ' ' || is_break(c)) {
            self.write_indicator("4", false, false);
        }
        let chars: Vec<char> = value.chars().collect();
        let chomp = match chars.as_slice() {
            [] => Some("-"),
            [.., last] if !is_break(*last) => Some("-"),
            [_] => Some("+"),
            [.., before, _] if is_break(*before) => Some("+"),
            _ => None,
        };
        if let Some(chomp) = chomp {
            self.write_indicator(chomp, false, false);
        }
        self.whitespace = true;
        let mut breaks = true;
        for c in chars {
            if is_break(c) {
                self.write_break(c);
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                self.put(c);
                self.indention = false;
                breaks = false;
            }
        }
    }
}

struct Analysis {
    multiline: bool,
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    block_allowed: bool,
}

fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// libyaml's `is_printable` on UTF-8: characters from U+10000 up are not.
fn is_printable(c: char) -> bool {
    let v = c as u32;
    v == 0x0A
        || (0x20..=0x7E).contains(&v)
        || (0xA0..=0xD7FF).contains(&v)
        || ((0xE000..=0xFFFD).contains(&v) && v != 0xFEFF)
}

/// emitterc.go's `analyze_scalar`, for the block context stowage writes.
fn analyze(value: &str) -> Analysis {
    if value.is_empty() {
        return Analysis {
            multiline: false,
            block_plain_allowed: true,
            single_quoted_allowed: true,
            block_allowed: false,
        };
    }
    let chars: Vec<char> = value.chars().collect();
    let mut block_indicators = value.starts_with("---") || value.starts_with("...");
    let mut line_breaks = false;
    let mut special = false;
    let mut tabs = false;
    let (mut leading_space, mut leading_break) = (false, false);
    let (mut trailing_space, mut trailing_break) = (false, false);
    let (mut break_space, mut space_break) = (false, false);
    let (mut previous_space, mut previous_break) = (false, false);
    let mut preceded_by_whitespace = true;
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_whitespace = chars.get(i + 1).is_none_or(|&n| is_blank(n));
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' | '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        if c == '\t' {
            tabs = true;
        } else if !is_printable(c) {
            special = true;
        }
        let last = i + 1 == chars.len();
        if c == ' ' {
            leading_space |= i == 0;
            trailing_space |= last;
            break_space |= previous_break;
            previous_space = true;
            previous_break = false;
        } else if is_break(c) {
            line_breaks = true;
            leading_break |= i == 0;
            trailing_break |= last;
            space_break |= previous_space;
            previous_space = false;
            previous_break = true;
        } else {
            previous_space = false;
            previous_break = false;
        }
        preceded_by_whitespace = is_blank(c) || is_break(c) || c == '\0';
    }
    let mut a = Analysis {
        multiline: line_breaks,
        block_plain_allowed: true,
        single_quoted_allowed: true,
        block_allowed: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        a.block_plain_allowed = false;
    }
    if trailing_space {
        a.block_allowed = false;
    }
    if break_space || space_break || tabs || special {
        a.block_plain_allowed = false;
        a.single_quoted_allowed = false;
    }
    if space_break || special {
        a.block_allowed = false;
    }
    if line_breaks || block_indicators {
        a.block_plain_allowed = false;
    }
    a
}

/// Whether yaml.v3's `resolve` reads `s`, unquoted, as a string.
fn resolves_to_string(s: &str) -> bool {
    match s.as_bytes().first() {
        None => false,
        Some(b'y' | b'Y' | b'n' | b'N' | b't' | b'T' | b'f' | b'F' | b'o' | b'O' | b'~') => {
            !matches!(
                s,
                "true"
                    | "True"
                    | "TRUE"
                    | "false"
                    | "False"
                    | "FALSE"
                    | "~"
                    | "null"
                    | "Null"
                    | "NULL"
            )
        }
        Some(b'.') => {
            !(matches!(s, ".nan" | ".NaN" | ".NAN" | ".inf" | ".Inf" | ".INF") || is_dot_float(s))
        }
        Some(b'+' | b'-' | b'0'..=b'9') => {
            if matches!(s, "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF") {
                return false;
            }
            !(is_timestamp(s) || is_go_number(&s.replace('_', "")))
        }
        Some(_) => true,
    }
}

/// Go's `strconv.ParseFloat` of a text starting with '.': `.5`, `.5e3`.
fn is_dot_float(s: &str) -> bool {
    let rest = &s[1..];
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    digits(mantissa) && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

/// An integer Go's `ParseInt`/`ParseUint` with base 0 accepts, or a float
/// of yaml.v3's `yamlStyleFloat`; `s` has no underscores.
fn is_go_number(s: &str) -> bool {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let all = |t: &str, ok: fn(u8) -> bool| !t.is_empty() && t.bytes().all(ok);
    let lower = unsigned.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return all(hex, |b| b.is_ascii_hexdigit());
    }
    if let Some(bin) = lower.strip_prefix("0b") {
        return all(bin, |b| b == b'0' || b == b'1');
    }
    if let Some(oct) = lower.strip_prefix("0o") {
        return all(oct, |b| (b'0'..=b'7').contains(&b));
    }
    // yamlStyleFloat: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let digits = |t: &str| all(t, |b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

/// yaml.v3's `parseTimestamp`: `YYYY-M-D`, optionally followed by a time
/// (`T`, `t` or a space, `H:M:S`, a fraction, and for `T`/`t` a zone).
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let mut i = 5;
    let number = |i: &mut usize, max: usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() && *i - start < max {
            *i += 1;
        }
        *i > start
    };
    if !number(&mut i, 2) || i >= b.len() || b[i] != b'-' {
        return false;
    }
    i += 1;
    if !number(&mut i, 2) {
        return false;
    }
    if i == b.len() {
        return true;
    }
    let separator = b[i];
    if !matches!(separator, b'T' | b't' | b' ') {
        return false;
    }
    i += 1;
    for part in 0..3 {
        if !number(&mut i, 2) {
            return false;
        }
        if part < 2 {
            if i >= b.len() || b[i] != b':' {
                return false;
            }
            i += 1;
        }
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if !number(&mut i, 9) {
            return false;
        }
    }
    if separator == b' ' {
        return i == b.len();
    }
    match &s[i..] {
        "Z" => true,
        zone => {
            let z = zone.as_bytes();
            z.len() == 6
                && (z[0] == b'+' || z[0] == b'-')
                && z[1..3].iter().all(u8::is_ascii_digit)
                && z[3] == b':'
                && z[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

fn is_base60_float(s: &str) -> bool {
    // ^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$
    let t = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (main, frac) = match t.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (t, None),
    };
    if frac.is_some_and(|f| !f.bytes().all(|b| b.is_ascii_digit() || b == b'_')) {
        return false;
    }
    let mut parts = main.split(':');
    let head = parts.next().unwrap_or("");
    if !head.as_bytes().first().is_some_and(u8::is_ascii_digit)
        || !head.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return false;
    }
    let mut sixties = 0;
    for p in parts {
        sixties += 1;
        let ok = match p.as_bytes() {
            [d] => d.is_ascii_digit(),
            [a, b] => (b'0'..=b'5').contains(a) && b.is_ascii_digit(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    sixties > 0
}

fn is_old_bool(s: &str) -> bool {
    matches!(
        s,
        "y" | "Y"
            | "yes"
            | "Yes"
            | "YES"
            | "on"
            | "On"
            | "ON"
            | "n"
            | "N"
            | "no"
            | "No"
            | "NO"
            | "off"
            | "Off"
            | "OFF"
    )
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 64)` as yaml.v3 writes it.
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return ".nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf" } else { "-.inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // Shortest round-trip digits and the decimal exponent.
    let e = format!("{:e}", f.abs());
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i64 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if !(-4..6).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1;
    if point <= 0 {
        let zeros = "0".repeat((-point) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let point = point as usize;
    if digits.len() <= point {
        let zeros = "0".repeat(point - digits.len());
        format!("{sign}{digits}{zeros}")
    } else {
        format!("{sign}{}.{}", &digits[..point], &digits[point..])
    }
}

/// yaml.v3's `keyList.Less` for two string keys: runs of digits compare as
/// numbers, letters before other characters.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    if natural_less(a, b) {
        Ordering::Less
    } else if natural_less(b, a) {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

fn natural_less(a: &str, b: &str) -> bool {
    let ar: Vec<char> = a.chars().collect();
    let br: Vec<char> = b.chars().collect();
    let mut digits = false;
    let mut i = 0;
    while i < ar.len() && i < br.len() {
        if ar[i] == br[i] {
            digits = ar[i].is_ascii_digit();
            i += 1;
            continue;
        }
        let al = ar[i].is_alphabetic();
        let bl = br[i].is_alphabetic();
        if al && bl {
            return ar[i] < br[i];
        }
        if al || bl {
            return if digits { al } else { bl };
        }
        let (mut an, mut bn): (i64, i64) = (0, 0);
        if ar[i] == '0' || br[i] == '0' {
            let mut j = i;
            while j > 0 && ar[j - 1].is_ascii_digit() {
                j -= 1;
                if ar[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let mut ai = i;
        while ai < ar.len() && ar[ai].is_ascii_digit() {
            an = an
                .wrapping_mul(10)
                .wrapping_add(i64::from(ar[ai] as u8 - b'0'));
            ai += 1;
        }
        let mut bi = i;
        while bi < br.len() && br[bi].is_ascii_digit() {
            bn = bn
                .wrapping_mul(10)
                .wrapping_add(i64::from(br[bi] as u8 - b'0'));
            bi += 1;
        }
        if an != bn {
            return an < bn;
        }
        if ai != bi {
            return ai < bi;
        }
        return ar[i] < br[i];
    }
    ar.len() < br.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each service's sha256 of `yaml.Marshal`, as Go's yaml.v3 (Debian's
    /// golang-gopkg-yaml.v3-dev, v3.0.1) computed it for the same file.
    fn hashes(yaml: &str) -> Vec<(String, String)> {
        let doc: Value =
            serde_saphyr::from_str_with_options(yaml, crate::app::compose_file::yaml_options())
                .unwrap();
        let services = doc["services"].as_object().unwrap();
        let mut out: Vec<(String, String)> = services
            .iter()
            .map(|(name, svc)| {
                let bytes = marshal(svc);
                (
                    name.clone(),
                    crate::Digest::of(bytes.as_bytes()).hex().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    const TRICKY_SCALARS: &str = r#"services:
  web:
    image: reg.example/web@sha256:aaaa
    ports: ["8080:80", "443"]
    environment:
      A: "1"
      B: yes
      C: ""
      EMPTY:
      MULTI: "line1\nline2\n"
      STAR: "*x"
      COLON: "a: b"
      SP: " lead"
      NUM: 1.5
      INT: 10
      BOOL: true
      x10: a
      x9: b
      x09: c
    command: ["sh", "-c", "echo hi && sleep 1000"]
    depends_on:
      db:
        condition: service_healthy
    labels:
      - "a=b"
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
    volumes: []
    deploy: {}
  db:
    image: "db:1"
    entrypoint: '#notcomment'
    user: "1000:1000"
    x: "~"
    y: null
    z: "null"
    t: "2001-12-14"
    u: "0x10"
    v: "1e3"
    w: "-"
    q: "'quoted'"
    r: '"dq"'
    s: "tab\there"
    k: "a #b"
    m: "ends:"
    n: "{x}"
    o: "[x]"
    p: "@x"
    ba: "`x"
    pct: "%x"
    amp: "&x"
    ex: "!x"
    pipe: "|x"
    gt: ">x"
    qm: "? x"
    dash: "- x"
    comma: "a,b"
    uni: "héllo"
    trail: "x "
"#;
    const LAYOUT: &str = r##"services:
  a:
    ports:
      - target: 80
        published: "8080"
        protocol: tcp
      - 81
    nested: [[1, 2], [], [{}]]
    longplain: "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo pppp qqqq rrrr ssss"
    longsingle: "#aaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo pppp qqqq rrrr ssss"
    longdouble: "aaa\tbbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo pppp qqqq rrrr ssss"
    lit1: "  indented\nline\n"
    lit2: "a\n\nb"
    lit3: "a\nb\n\n"
    f1: 1.0
    f2: 1e21
    f3: 0.00001
    f4: 123456789.5
    big: 18446744073709551615
    neg: -5
    cmd:
      - long command aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn oooo pppp
    deep:
      x:
        - y: |
            multi
            line
"##;

    #[test]
    fn service_hashes_are_those_yaml_v3_gives() {
        assert_eq!(
            hashes(TRICKY_SCALARS),
            vec![
                (
                    "db".into(),
                    "b0b8c5d68dcffaf5881b12804f02118dfdf3ea8ee9308b930e0211b1eb0b45c8".into()
                ),
                (
                    "web".into(),
                    "9743d638453714b565a7bba2a070865d6dd5519e1f160abf71a0748d25b0498b".into()
                ),
            ]
        );
        assert_eq!(
            hashes(LAYOUT),
            vec![(
                "a".into(),
                "7a3929298db8aa55bb16544a099f949cdb3474a5650922f48191a807e1b9791f".into()
            )]
        );
    }

    #[test]
    fn keys_sort_as_yaml_v3_sorts_them() {
        let mut keys = vec!["x10", "x9", "x09", "b", "a1", "A", "_z"];
        keys.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(keys, vec!["_z", "A", "a1", "b", "x9", "x09", "x10"]);
    }

    #[test]
    fn floats_are_written_as_go_writes_them() {
        for (f, want) in [
            (1.0, "1"),
            (1.5, "1.5"),
            (1e21, "1e+21"),
            (0.00001, "1e-05"),
            (0.0001, "0.0001"),
            (123456789.5, "1.234567895e+08"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (-2.5, "-2.5"),
        ] {
            assert_eq!(go_float(f), want, "{f}");
        }
    }
}
