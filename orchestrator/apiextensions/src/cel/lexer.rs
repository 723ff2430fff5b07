//! CEL's lexis (cel-spec `langdef.md`): tokens read one at a time, with
//! literals decoded as they are read.
//!
//! Numbers: ints (`12`, `0x1F`), uints (`12u`, `0x1Fu`), doubles (`1.5`,
//! `.5`, `1e-3`, `2.5E+10`); a sign is an operator, joined to the literal
//! by the parser. Strings and bytes: `'…'`, `"…"`, `'''…'''`, `"""…"""`
//! (which may span lines), raw with an `r` prefix, bytes with a `b` prefix
//! (then optionally `r`), escapes `\a \b \f \n \r \t \v \\ \' \" \?`, a
//! backslash before a backquote, `\xHH`, `\uHHHH` (a surrogate pair
//! combines), `\UHHHHHHHH` and octal `\[0-3][0-7][0-7]`; in bytes `\x` and
//! octal escapes are octets and `\u`, `\U` are refused. White space is
//! `[ \t\n\f\r]`; comments run from `//` to the end of the line.

/// A lexical or syntax error at a byte offset of the source.
#[derive(Debug)]
pub(super) struct SyntaxError {
    pub(super) at: usize,
    pub(super) message: String,
}

impl SyntaxError {
    pub(super) fn new(at: usize, message: impl Into<String>) -> Self {
        SyntaxError {
            at,
            message: message.into(),
        }
    }

    /// cel-go's form: `ERROR: <input>:line:column: message`, the line and
    /// column counted from 1, the column in characters.
    pub(super) fn render(&self, source: &str) -> String {
        let before = &source[..floor_char_boundary(source, self.at)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let column = before[line_start..].chars().count() + 1;
        format!("ERROR: <input>:{line}:{column}: {}", self.message)
    }
}

fn floor_char_boundary(source: &str, mut at: usize) -> usize {
    at = at.min(source.len());
    while !source.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Kind<'s> {
    /// An int's magnitude: the parser checks its range once it knows the
    /// sign.
    Int(u64),
    Uint(u64),
    Double(f64),
    String(Box<str>),
    Bytes(Box<[u8]>),
    Ident(&'s str),
    True,
    False,
    Null,
    In,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Dot,
    Comma,
    Colon,
    Question,
    Not,
    Minus,
    Plus,
    Star,
    Slash,
    Percent,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    End,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Token<'s> {
    pub(super) kind: Kind<'s>,
    /// Byte offsets of the token in the source.
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Token<'_> {
    /// The token as error messages quote it.
    pub(super) fn describe(&self, source: &str) -> String {
        if self.kind == Kind::End {
            return "end of input".into();
        }
        // The first line, and at most this many characters of it.
        const SHOWN: usize = 24;
        let text = &source[self.start..self.end];
        let line = text.find(['\n', '\r']).unwrap_or(text.len());
        match text[..line].char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("'{}…'", &text[..cut]),
            None if line < text.len() => format!("'{}…'", &text[..line]),
            None => format!("'{text}'"),
        }
    }
}

pub(super) struct Lexer<'s> {
    source: &'s str,
    at: usize,
}

impl<'s> Lexer<'s> {
    pub(super) fn new(source: &'s str) -> Self {
        Lexer { source, at: 0 }
    }

    fn peek_byte(&self, ahead: usize) -> Option<u8> {
        self.source.as_bytes().get(self.at + ahead).copied()
    }

    fn rest(&self) -> &'s str {
        &self.source[self.at..]
    }

    pub(super) fn next_token(&mut self) -> Result<Token<'s>, SyntaxError> {
        self.skip_space();
        let start = self.at;
        let kind = self.kind(start)?;
        Ok(Token {
            kind,
            start,
            end: self.at,
        })
    }

    fn skip_space(&mut self) {
        loop {
            match self.peek_byte(0) {
                Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') => self.at += 1,
                Some(b'/') if self.peek_byte(1) == Some(b'/') => {
                    self.at = self
                        .rest()
                        .find('\n')
                        .map_or(self.source.len(), |end| self.at + end);
                }
                _ => return,
            }
        }
    }

    fn kind(&mut self, start: usize) -> Result<Kind<'s>, SyntaxError> {
        let Some(byte) = self.peek_byte(0) else {
            return Ok(Kind::End);
        };
        let next = self.peek_byte(1);
        let (kind, len) = match (byte, next) {
            (b'a'..=b'z' | b'A'..=b'Z' | b'_', _) => return self.word(start),
            (b'0'..=b'9', _) => return self.number(start),
            (b'.', Some(b'0'..=b'9')) => return self.number(start),
            (b'\'' | b'"', _) => return self.quoted(start, false, false),
            (b'(', _) => (Kind::LParen, 1),
            (b')', _) => (Kind::RParen, 1),
            (b'[', _) => (Kind::LBracket, 1),
            (b']', _) => (Kind::RBracket, 1),
            (b'{', _) => (Kind::LBrace, 1),
            (b'}', _) => (Kind::RBrace, 1),
            (b'.', _) => (Kind::Dot, 1),
            (b',', _) => (Kind::Comma, 1),
            (b':', _) => (Kind::Colon, 1),
            (b'?', _) => (Kind::Question, 1),
            (b'+', _) => (Kind::Plus, 1),
            (b'-', _) => (Kind::Minus, 1),
            (b'*', _) => (Kind::Star, 1),
            (b'/', _) => (Kind::Slash, 1),
            (b'%', _) => (Kind::Percent, 1),
            (b'=', Some(b'=')) => (Kind::Eq, 2),
            (b'!', Some(b'=')) => (Kind::Ne, 2),
            (b'!', _) => (Kind::Not, 1),
            (b'<', Some(b'=')) => (Kind::Le, 2),
            (b'<', _) => (Kind::Lt, 1),
            (b'>', Some(b'=')) => (Kind::Ge, 2),
            (b'>', _) => (Kind::Gt, 1),
            (b'&', Some(b'&')) => (Kind::And, 2),
            (b'|', Some(b'|')) => (Kind::Or, 2),
            (b'=', _) => return Err(self.unexpected(start, " (comparison is '==')")),
            (b'&', _) => return Err(self.unexpected(start, " (logical and is '&&')")),
            (b'|', _) => return Err(self.unexpected(start, " (logical or is '||')")),
            (b'`', _) => {
                return Err(self.unexpected(start, " (quoted identifiers are not supported)"))
            }
            _ => return Err(self.unexpected(start, "")),
        };
        self.at += len;
        Ok(kind)
    }

    fn unexpected(&self, at: usize, note: &str) -> SyntaxError {
        let c = self.source[at..].chars().next().unwrap_or_default();
        let shown = if c.is_control() || c.is_whitespace() {
            format!("{:?}", c)
        } else {
            format!("'{c}'")
        };
        SyntaxError::new(
            at,
            format!("Syntax error: unexpected character {shown}{note}"),
        )
    }

    /// An identifier, a keyword, or the prefix of a string or bytes literal.
    fn word(&mut self, start: usize) -> Result<Kind<'s>, SyntaxError> {
        let len = self
            .rest()
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let word = &self.source[start..start + len];
        self.at += len;
        if matches!(self.peek_byte(0), Some(b'\'' | b'"')) {
            let (raw, bytes) = match word.as_bytes() {
                [b'r' | b'R'] => (true, false),
                [b'b' | b'B'] => (false, true),
                [b'b' | b'B', b'r' | b'R'] => (true, true),
                _ => (false, false),
            };
            if raw || bytes {
                return self.quoted(start, raw, bytes);
            }
        }
        Ok(match word {
            "true" => Kind::True,
            "false" => Kind::False,
            "null" => Kind::Null,
            "in" => Kind::In,
            _ => Kind::Ident(word),
        })
    }

    fn digits(&mut self, hex: bool) -> usize {
        let len = self
            .rest()
            .bytes()
            .take_while(|b| {
                if hex {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
            .count();
        self.at += len;
        len
    }

    fn number(&mut self, start: usize) -> Result<Kind<'s>, SyntaxError> {
        let hex = self.rest().starts_with("0x")
            && self.peek_byte(2).is_some_and(|b| b.is_ascii_hexdigit());
        if hex {
            self.at += 2;
            self.digits(true);
        } else {
            self.digits(false);
        }
        let mut double = false;
        if !hex {
            if self.peek_byte(0) == Some(b'.')
                && self.peek_byte(1).is_some_and(|b| b.is_ascii_digit())
            {
                self.at += 1;
                self.digits(false);
                double = true;
            }
            if matches!(self.peek_byte(0), Some(b'e' | b'E')) {
                let sign = usize::from(matches!(self.peek_byte(1), Some(b'+' | b'-')));
                if self.peek_byte(1 + sign).is_some_and(|b| b.is_ascii_digit()) {
                    self.at += 1 + sign;
                    self.digits(false);
                    double = true;
                }
            }
        }
        let text = &self.source[start..self.at];
        if double {
            return match text.parse::<f64>() {
                Ok(d) if d.is_finite() => Ok(Kind::Double(d)),
                _ => Err(SyntaxError::new(
                    start,
                    format!("double literal out of range: {}", shorten(text)),
                )),
            };
        }
        let unsigned = matches!(self.peek_byte(0), Some(b'u' | b'U'));
        let magnitude = if hex {
            u64::from_str_radix(&text[2..], 16)
        } else {
            text.parse::<u64>()
        };
        if unsigned {
            self.at += 1;
        }
        let kind = if unsigned { "uint" } else { "int" };
        let magnitude = magnitude.map_err(|_| {
            SyntaxError::new(
                start,
                format!("{kind} literal out of range: {}", shorten(text)),
            )
        })?;
        Ok(if unsigned {
            Kind::Uint(magnitude)
        } else {
            Kind::Int(magnitude)
        })
    }

    /// A string or bytes literal whose opening quote is at `self.at`.
    fn quoted(&mut self, start: usize, raw: bool, bytes: bool) -> Result<Kind<'s>, SyntaxError> {
        let Some(quote) = self.peek_byte(0) else {
            return Err(SyntaxError::new(
                start,
                "Syntax error: unterminated string literal",
            ));
        };
        let triple = self.peek_byte(1) == Some(quote) && self.peek_byte(2) == Some(quote);
        self.at += if triple { 3 } else { 1 };
        let unterminated = || SyntaxError::new(start, "Syntax error: unterminated string literal");
        let mut out = Vec::new();
        loop {
            let Some(byte) = self.peek_byte(0) else {
                return Err(unterminated());
            };
            if byte == quote && (!triple || self.rest().as_bytes().starts_with(&[quote; 3])) {
                self.at += if triple { 3 } else { 1 };
                break;
            }
            if !triple && matches!(byte, b'\n' | b'\r') {
                return Err(SyntaxError::new(
                    start,
                    "Syntax error: unterminated string literal (a quoted string ends on its \
                     line; triple quotes span lines)",
                ));
            }
            if byte == b'\\' && !raw {
                self.escape(bytes, &mut out)?;
            } else {
                // Copy up to the next byte that may matter, keeping
                // multi-byte characters whole.
                let len = self
                    .rest()
                    .bytes()
                    .skip(1)
                    .position(|b| b == quote || b == b'\\' || b == b'\n' || b == b'\r')
                    .map_or(self.rest().len(), |p| p + 1);
                out.extend_from_slice(&self.rest().as_bytes()[..len]);
                self.at += len;
            }
        }
        if bytes {
            return Ok(Kind::Bytes(out.into()));
        }
        // Only whole characters were copied or escaped in.
        String::from_utf8(out)
            .map(|s| Kind::String(s.into()))
            .map_err(|_| SyntaxError::new(start, "Syntax error: invalid string literal"))
    }

    /// The escape sequence at `self.at`, appended to `out`.
    fn escape(&mut self, bytes: bool, out: &mut Vec<u8>) -> Result<(), SyntaxError> {
        let start = self.at;
        let Some(code) = self.peek_byte(1) else {
            return Err(SyntaxError::new(
                start,
                "Syntax error: unterminated string literal",
            ));
        };
        self.at += 2;
        let simple = match code {
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(0x0b),
            b'\\' | b'\'' | b'"' | b'?' | b'`' => Some(code),
            _ => None,
        };
        if let Some(byte) = simple {
            out.push(byte);
            return Ok(());
        }
        let invalid = |lexer: &Self, why: &str| {
            let end = lexer.at.min(lexer.source.len());
            let shown = shorten(&lexer.source[start..floor_char_boundary(lexer.source, end)]);
            SyntaxError::new(
                start,
                format!("Syntax error: invalid escape sequence '{shown}'{why}"),
            )
        };
        let code_point = match code {
            b'x' | b'X' => self.hex(2).ok_or_else(|| invalid(self, ""))?,
            b'u' | b'U' if bytes => {
                return Err(invalid(self, " (\\u and \\U are for strings, not bytes)"))
            }
            b'u' => {
                let unit = self.hex(4).ok_or_else(|| invalid(self, ""))?;
                if (0xd800..0xdc00).contains(&unit) && self.rest().starts_with("\\u") {
                    // A high surrogate: the low one must follow.
                    self.at += 2;
                    let low = self.hex(4).ok_or_else(|| invalid(self, ""))?;
                    if !(0xdc00..0xe000).contains(&low) {
                        return Err(invalid(self, " (an unpaired surrogate)"));
                    }
                    0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00)
                } else {
                    unit
                }
            }
            b'U' => self.hex(8).ok_or_else(|| invalid(self, ""))?,
            b'0'..=b'3' => {
                let octal = |b: Option<u8>| b.filter(|b| (b'0'..=b'7').contains(b));
                match (octal(self.peek_byte(0)), octal(self.peek_byte(1))) {
                    (Some(b), Some(c)) => {
                        self.at += 2;
                        (u32::from(code - b'0') << 6)
                            | (u32::from(b - b'0') << 3)
                            | u32::from(c - b'0')
                    }
                    _ => return Err(invalid(self, " (octal escapes take three digits)")),
                }
            }
            _ => {
                // Show the whole character after the backslash.
                let c = self.source[start + 1..].chars().next().unwrap_or_default();
                if c.is_control() || c.is_whitespace() {
                    return Err(SyntaxError::new(
                        start,
                        format!("Syntax error: invalid escape sequence: a backslash before {c:?}"),
                    ));
                }
                self.at = start + 1 + c.len_utf8();
                return Err(invalid(self, ""));
            }
        };
        if bytes {
            // `\x` and octal escapes, both below 256.
            out.push(code_point as u8);
            return Ok(());
        }
        let c = char::from_u32(code_point)
            .ok_or_else(|| invalid(self, " (not a Unicode scalar value)"))?;
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        Ok(())
    }

    /// `digits` hex digits at `self.at`, consumed when all are there.
    fn hex(&mut self, digits: usize) -> Option<u32> {
        let text = self.rest().get(..digits)?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at += digits;
        u32::from_str_radix(text, 16).ok()
    }
}

/// A literal as error messages quote it.
fn shorten(text: &str) -> String {
    const SHOWN: usize = 32;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
