//! Filter expressions: libpcap compiles them, we run them.
//!
//! libpcap's compiler (`pcap_compile` through the `pcap` crate) is the only
//! way to get tcpdump's exact semantics for pcap-filter syntax, so we never
//! parse expressions ourselves. The classic-BPF program it emits is then
//! pre-decoded into [`Insn`] with absolute jump targets and validated once,
//! which lets the hot loop run without per-instruction decoding or target
//! checks.

use std::fmt;

/// Link-layer header types we compile for (values are DLT_* numbers).
pub const LINKTYPE_ETHERNET: u32 = 1;

/// A filter expression that libpcap rejected, with libpcap's own message.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter expression {expr:?}: {message}")]
pub struct FilterError {
    pub expr: String,
    pub message: String,
}

/// One raw classic-BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A pre-decoded instruction. Jump targets are absolute indices.
#[derive(Debug, Clone, Copy)]
enum Insn {
    LdAbsW(u32),
    LdAbsH(u32),
    LdAbsB(u32),
    LdIndW(u32),
    LdIndH(u32),
    LdIndB(u32),
    LdImm(u32),
    LdLen,
    LdMem(usize),
    LdxImm(u32),
    LdxLen,
    LdxMem(usize),
    LdxMsh(u32),
    St(usize),
    Stx(usize),
    Alu(AluOp, Operand),
    Neg,
    Ja(usize),
    Jmp(JmpOp, Operand, usize, usize),
    RetK(u32),
    RetA,
    RetX,
    Tax,
    Txa,
    /// A load immediately followed by a conditional jump against a
    /// constant, fused so the pair costs one dispatch. (The jump also stays
    /// in place on its own for anything that jumps to it directly.)
    LdJmp(Load, u32, JmpOp, u32, u32, u32),
}

/// The packet load of a fused load-and-jump.
#[derive(Debug, Clone, Copy)]
enum Load {
    AbsB,
    AbsH,
    AbsW,
    IndB,
    IndH,
    IndW,
}

#[derive(Debug, Clone, Copy)]
enum AluOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Or,
    And,
    Xor,
    Lsh,
    Rsh,
}

#[derive(Debug, Clone, Copy)]
enum JmpOp {
    Eq,
    Gt,
    Ge,
    Set,
}

#[derive(Debug, Clone, Copy)]
enum Operand {
    K(u32),
    X,
}

/// Why a raw program could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgramError {
    #[error("empty program")]
    Empty,
    #[error("instruction {0}: unknown opcode {1:#06x}")]
    BadOpcode(usize, u16),
    #[error("instruction {0}: jump out of program")]
    BadJump(usize),
    #[error("instruction {0}: scratch memory index {1} out of range")]
    BadMem(usize, u32),
    #[error("program does not end with a return")]
    NoReturn,
}

/// A validated classic-BPF program ready to run.
#[derive(Clone)]
pub struct Program {
    insns: Box<[Insn]>,
    raw: Vec<RawInsn>,
    /// `true` when the program accepts everything (empty expression), so the
    /// hot path can skip evaluation entirely.
    accept_all: bool,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("len", &self.insns.len())
            .finish()
    }
}

const BPF_MEMWORDS: u32 = 16;

impl Program {
    /// Compiles `expr` (tcpdump syntax) for `linktype` with libpcap, the way
    /// `tcpdump -r` does it (optimizer on, netmask unknown).
    pub fn compile(expr: &str, linktype: u32, snaplen: u32) -> Result<Self, FilterError> {
        let raw = compile_raw(expr, linktype, snaplen)?;
        Program::from_raw(&raw).map_err(|e| FilterError {
            expr: expr.to_string(),
            message: format!("libpcap produced a program we cannot run: {e}"),
        })
    }

    /// Loads and validates a raw program.
    pub fn from_raw(raw: &[RawInsn]) -> Result<Self, ProgramError> {
        if raw.is_empty() {
            return Err(ProgramError::Empty);
        }
        let n = raw.len();
        let mut insns = Vec::with_capacity(n);
        for (pc, ins) in raw.iter().enumerate() {
            let k = ins.k;
            let mem = |k: u32| {
                if k < BPF_MEMWORDS {
                    Ok(k as usize)
                } else {
                    Err(ProgramError::BadMem(pc, k))
                }
            };
            // Relative jumps count from the next instruction.
            let target = |off: u64| -> Result<usize, ProgramError> {
                let t = pc as u64 + 1 + off;
                if t < n as u64 {
                    Ok(t as usize)
                } else {
                    Err(ProgramError::BadJump(pc))
                }
            };
            let code = ins.code;
            let bad = || ProgramError::BadOpcode(pc, code);
            let src = if code & 0x08 != 0 {
                Operand::X
            } else {
                Operand::K(k)
            };
            let decoded = match code & 0x07 {
                // BPF_LD
                0x00 => match (code & 0xe0, code & 0x18) {
                    (0x00, 0x00) => Insn::LdImm(k),
                    (0x20, 0x00) => Insn::LdAbsW(k),
                    (0x20, 0x08) => Insn::LdAbsH(k),
                    (0x20, 0x10) => Insn::LdAbsB(k),
                    (0x40, 0x00) => Insn::LdIndW(k),
                    (0x40, 0x08) => Insn::LdIndH(k),
                    (0x40, 0x10) => Insn::LdIndB(k),
                    (0x60, 0x00) => Insn::LdMem(mem(k)?),
                    (0x80, 0x00) => Insn::LdLen,
                    _ => return Err(bad()),
                },
                // BPF_LDX
                0x01 => match (code & 0xe0, code & 0x18) {
                    (0x00, 0x00) => Insn::LdxImm(k),
                    (0x60, 0x00) => Insn::LdxMem(mem(k)?),
                    (0x80, 0x00) => Insn::LdxLen,
                    (0xa0, 0x10) => Insn::LdxMsh(k),
                    _ => return Err(bad()),
                },
                0x02 => Insn::St(mem(k)?),
                0x03 => Insn::Stx(mem(k)?),
                // BPF_ALU
                0x04 => {
                    let op = match code & 0xf0 {
                        0x00 => AluOp::Add,
                        0x10 => AluOp::Sub,
                        0x20 => AluOp::Mul,
                        0x30 => AluOp::Div,
                        0x40 => AluOp::Or,
                        0x50 => AluOp::And,
                        0x60 => AluOp::Lsh,
                        0x70 => AluOp::Rsh,
                        0x80 => {
                            insns.push(Insn::Neg);
                            continue;
                        }
                        0x90 => AluOp::Mod,
                        0xa0 => AluOp::Xor,
                        _ => return Err(bad()),
                    };
                    Insn::Alu(op, src)
                }
                // BPF_JMP
                0x05 => {
                    let op = match code & 0xf0 {
                        0x00 => {
                            insns.push(Insn::Ja(target(k as u64)?));
                            continue;
                        }
                        0x10 => JmpOp::Eq,
                        0x20 => JmpOp::Gt,
                        0x30 => JmpOp::Ge,
                        0x40 => JmpOp::Set,
                        _ => return Err(bad()),
                    };
                    Insn::Jmp(op, src, target(ins.jt as u64)?, target(ins.jf as u64)?)
                }
                // BPF_RET
                0x06 => match code & 0x18 {
                    0x00 => Insn::RetK(k),
                    0x08 => Insn::RetX,
                    0x10 => Insn::RetA,
                    _ => return Err(bad()),
                },
                // BPF_MISC
                _ => match code & 0xf8 {
                    0x00 => Insn::Tax,
                    0x80 => Insn::Txa,
                    _ => return Err(bad()),
                },
            };
            insns.push(decoded);
        }
        // Every path must end in a return; since jumps only go forward, it is
        // enough that the last instruction is one.
        if !matches!(insns[n - 1], Insn::RetK(_) | Insn::RetA | Insn::RetX) {
            return Err(ProgramError::NoReturn);
        }
        // Peephole: fuse `ld [k]; jxx #v` pairs.
        for i in 0..n.saturating_sub(1) {
            let load = match insns[i] {
                Insn::LdAbsB(k) => (Load::AbsB, k),
                Insn::LdAbsH(k) => (Load::AbsH, k),
                Insn::LdAbsW(k) => (Load::AbsW, k),
                Insn::LdIndB(k) => (Load::IndB, k),
                Insn::LdIndH(k) => (Load::IndH, k),
                Insn::LdIndW(k) => (Load::IndW, k),
                _ => continue,
            };
            if let Insn::Jmp(op, Operand::K(v), jt, jf) = insns[i + 1] {
                insns[i] = Insn::LdJmp(load.0, load.1, op, v, jt as u32, jf as u32);
            }
        }
        let accept_all = matches!(insns[0], Insn::RetK(k) if k != 0);
        Ok(Program {
            insns: insns.into_boxed_slice(),
            raw: raw.to_vec(),
            accept_all,
        })
    }

    /// The raw instructions, as `tcpdump -ddd` would print them.
    pub fn raw(&self) -> &[RawInsn] {
        &self.raw
    }

    /// Runs the program over `pkt` (the captured bytes) with `wire_len` as
    /// the packet's length on the wire. Returns the program's return value:
    /// 0 rejects, anything else accepts.
    #[inline]
    pub fn run(&self, pkt: &[u8], wire_len: u32) -> u32 {
        if self.accept_all {
            return u32::MAX;
        }
        let insns = &*self.insns;
        let mut a: u32 = 0;
        let mut x: u32 = 0;
        let mut mem = [0u32; BPF_MEMWORDS as usize];
        let mut pc = 0usize;
        loop {
            // `from_raw` proved every target is in range, and the last
            // instruction returns, so `pc` never leaves the program; the
            // bounds check stays for safety and is well predicted.
            let insn = insns[pc];
            pc += 1;
            match insn {
                Insn::LdJmp(load, k, op, v, jt, jf) => {
                    let loaded = match load {
                        Load::AbsB => pkt.get(k as usize).map(|&b| b as u32),
                        Load::AbsH => load_h(pkt, k as usize),
                        Load::AbsW => load_w(pkt, k as usize),
                        Load::IndB => pkt.get(ind(x, k)).map(|&b| b as u32),
                        Load::IndH => load_h(pkt, ind(x, k)),
                        Load::IndW => load_w(pkt, ind(x, k)),
                    };
                    let Some(val) = loaded else {
                        return 0;
                    };
                    a = val;
                    let taken = match op {
                        JmpOp::Eq => a == v,
                        JmpOp::Gt => a > v,
                        JmpOp::Ge => a >= v,
                        JmpOp::Set => a & v != 0,
                    };
                    pc = if taken { jt as usize } else { jf as usize };
                }
                Insn::LdAbsB(k) => match pkt.get(k as usize) {
                    Some(&b) => a = b as u32,
                    None => return 0,
                },
                Insn::LdAbsH(k) => match load_h(pkt, k as usize) {
                    Some(v) => a = v,
                    None => return 0,
                },
                Insn::LdAbsW(k) => match load_w(pkt, k as usize) {
                    Some(v) => a = v,
                    None => return 0,
                },
                Insn::LdIndB(k) => match pkt.get(ind(x, k)) {
                    Some(&b) => a = b as u32,
                    None => return 0,
                },
                Insn::LdIndH(k) => match load_h(pkt, ind(x, k)) {
                    Some(v) => a = v,
                    None => return 0,
                },
                Insn::LdIndW(k) => match load_w(pkt, ind(x, k)) {
                    Some(v) => a = v,
                    None => return 0,
                },
                Insn::LdImm(k) => a = k,
                Insn::LdLen => a = wire_len,
                Insn::LdMem(i) => a = mem[i],
                Insn::LdxImm(k) => x = k,
                Insn::LdxLen => x = wire_len,
                Insn::LdxMem(i) => x = mem[i],
                Insn::LdxMsh(k) => match pkt.get(k as usize) {
                    Some(&b) => x = ((b & 0x0f) as u32) << 2,
                    None => return 0,
                },
                Insn::St(i) => mem[i] = a,
                Insn::Stx(i) => mem[i] = x,
                Insn::Alu(op, src) => {
                    let v = match src {
                        Operand::K(k) => k,
                        Operand::X => x,
                    };
                    a = match op {
                        AluOp::Add => a.wrapping_add(v),
                        AluOp::Sub => a.wrapping_sub(v),
                        AluOp::Mul => a.wrapping_mul(v),
                        AluOp::Div => match a.checked_div(v) {
                            Some(r) => r,
                            // libpcap rejects the packet on division by zero.
                            None => return 0,
                        },
                        AluOp::Mod => match a.checked_rem(v) {
                            Some(r) => r,
                            None => return 0,
                        },
                        AluOp::Or => a | v,
                        AluOp::And => a & v,
                        AluOp::Xor => a ^ v,
                        // Shifts of 32 or more give 0, as in libpcap.
                        AluOp::Lsh => a.checked_shl(v).unwrap_or(0),
                        AluOp::Rsh => a.checked_shr(v).unwrap_or(0),
                    };
                }
                Insn::Neg => a = a.wrapping_neg(),
                Insn::Ja(t) => pc = t,
                Insn::Jmp(op, src, jt, jf) => {
                    let v = match src {
                        Operand::K(k) => k,
                        Operand::X => x,
                    };
                    let taken = match op {
                        JmpOp::Eq => a == v,
                        JmpOp::Gt => a > v,
                        JmpOp::Ge => a >= v,
                        JmpOp::Set => a & v != 0,
                    };
                    pc = if taken { jt } else { jf };
                }
                Insn::RetK(k) => return k,
                Insn::RetA => return a,
                Insn::RetX => return x,
                Insn::Tax => x = a,
                Insn::Txa => a = x,
            }
        }
    }

    /// Whether the packet passes the filter.
    #[inline]
    pub fn matches(&self, pkt: &[u8], wire_len: u32) -> bool {
        self.run(pkt, wire_len) != 0
    }
}

/// X + k as a packet offset; an overflowing sum is out of any packet.
#[inline(always)]
fn ind(x: u32, k: u32) -> usize {
    match x.checked_add(k) {
        Some(o) => o as usize,
        None => usize::MAX,
    }
}

#[inline(always)]
fn load_h(pkt: &[u8], off: usize) -> Option<u32> {
    let b = pkt.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]) as u32)
}

#[inline(always)]
fn load_w(pkt: &[u8], off: usize) -> Option<u32> {
    let b = pkt.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Runs libpcap's compiler and returns its raw instructions.
pub fn compile_raw(expr: &str, linktype: u32, snaplen: u32) -> Result<Vec<RawInsn>, FilterError> {
    let err = |message: String| FilterError {
        expr: expr.to_string(),
        message,
    };
    // The `pcap` crate opens dead handles with snaplen 65535; libpcap only
    // uses it for the accept value, and the evaluator treats any non-zero
    // return as "keep" (offline, tcpdump does not truncate by it either).
    let _ = snaplen;
    let dead =
        pcap::Capture::dead(pcap::Linktype(linktype as i32)).map_err(|e| err(e.to_string()))?;
    let prog = dead.compile(expr, true).map_err(|e| match e {
        pcap::Error::PcapError(m) => err(m),
        other => err(other.to_string()),
    })?;
    // The crate keeps `bpf_insn`'s fields private but prints them as
    // "code jt jf k"; parse that rather than reaching into its layout.
    prog.get_instructions()
        .iter()
        .map(|ins| {
            let s = ins.to_string();
            let mut it = s.split_ascii_whitespace().map(|f| f.parse::<u64>());
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(Ok(code)), Some(Ok(jt)), Some(Ok(jf)), Some(Ok(k))) => Ok(RawInsn {
                    code: code as u16,
                    jt: jt as u8,
                    jf: jf as u8,
                    k: k as u32,
                }),
                _ => Err(err(format!("unexpected instruction text {s:?}"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(expr: &str) -> Program {
        Program::compile(expr, LINKTYPE_ETHERNET, 65535).unwrap()
    }

    /// Ethernet + IPv4 + TCP SYN from 10.0.0.1:1234 to 10.0.0.2:80.
    fn tcp_syn() -> Vec<u8> {
        let mut p = vec![0u8; 14 + 20 + 20];
        p[12] = 0x08;
        p[14] = 0x45;
        p[16..18].copy_from_slice(&40u16.to_be_bytes());
        p[22] = 64;
        p[23] = 6;
        p[26..30].copy_from_slice(&[10, 0, 0, 1]);
        p[30..34].copy_from_slice(&[10, 0, 0, 2]);
        p[34..36].copy_from_slice(&1234u16.to_be_bytes());
        p[36..38].copy_from_slice(&80u16.to_be_bytes());
        p[46] = 0x50;
        p[47] = 0x02;
        p
    }

    #[test]
    fn basic_expressions() {
        let p = tcp_syn();
        let len = p.len() as u32;
        for (expr, want) in [
            ("", true),
            ("tcp", true),
            ("udp", false),
            ("host 10.0.0.1", true),
            ("src host 10.0.0.2", false),
            ("net 10.0.0.0/24 and dst port 80", true),
            ("portrange 70-90", true),
            ("portrange 81-90", false),
            ("tcp[tcpflags] & tcp-syn != 0", true),
            ("tcp[tcpflags] & tcp-ack != 0", false),
            ("not vlan", true),
            ("ip6", false),
            ("len > 100", false),
            ("len <= 54", true),
        ] {
            assert_eq!(prog(expr).matches(&p, len), want, "{expr}");
        }
    }

    #[test]
    fn truncated_packets_are_rejected_not_crashed() {
        let p = tcp_syn();
        let f = prog("tcp dst port 80");
        for cut in 0..p.len() {
            let _ = f.matches(&p[..cut], p.len() as u32);
        }
        assert!(!f.matches(&p[..30], 54));
    }

    #[test]
    fn invalid_expression_has_libpcap_message() {
        let e = Program::compile("tcp porrt 80", LINKTYPE_ETHERNET, 65535).unwrap_err();
        assert!(e.message.contains("syntax error"), "{}", e.message);
        let e = Program::compile("host 999.1.1.1", LINKTYPE_ETHERNET, 65535).unwrap_err();
        assert!(!e.message.is_empty());
    }

    #[test]
    fn rejects_bad_programs() {
        let ret = RawInsn {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 1,
        };
        assert_eq!(Program::from_raw(&[]).unwrap_err(), ProgramError::Empty);
        let jmp = RawInsn {
            code: 0x15,
            jt: 5,
            jf: 0,
            k: 0,
        };
        assert_eq!(
            Program::from_raw(&[jmp, ret]).unwrap_err(),
            ProgramError::BadJump(0)
        );
        let st = RawInsn {
            code: 0x02,
            jt: 0,
            jf: 0,
            k: 16,
        };
        assert_eq!(
            Program::from_raw(&[st, ret]).unwrap_err(),
            ProgramError::BadMem(0, 16)
        );
        let ld = RawInsn {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        };
        assert_eq!(
            Program::from_raw(&[ld]).unwrap_err(),
            ProgramError::NoReturn
        );
    }

    #[test]
    fn alu_edge_cases() {
        // A = 7; A /= X (X = 0) -> reject.
        let prog = Program::from_raw(&[
            RawInsn {
                code: 0x00,
                jt: 0,
                jf: 0,
                k: 7,
            },
            RawInsn {
                code: 0x3c,
                jt: 0,
                jf: 0,
                k: 0,
            },
            RawInsn {
                code: 0x16,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ])
        .unwrap();
        assert_eq!(prog.run(&[], 0), 0);
        // A = 1; A <<= 40 -> 0; ret A + 5.
        let prog = Program::from_raw(&[
            RawInsn {
                code: 0x00,
                jt: 0,
                jf: 0,
                k: 1,
            },
            RawInsn {
                code: 0x64,
                jt: 0,
                jf: 0,
                k: 40,
            },
            RawInsn {
                code: 0x04,
                jt: 0,
                jf: 0,
                k: 5,
            },
            RawInsn {
                code: 0x16,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ])
        .unwrap();
        assert_eq!(prog.run(&[], 0), 5);
    }
}
