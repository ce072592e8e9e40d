//! SMTP command parsing: one CRLF- (or LF-) terminated line in, a typed [`Command`] or the
//! exact error [`Reply`] out.
//!
//! Tokenising is smtp-proto's; this module adds what a receiving MTA must enforce on top:
//! address syntax (RFC 5321 §4.1.2, §4.5.3.1), SMTPUTF8 for non-ASCII addresses (RFC 6531),
//! and refusal of parameters for extensions Baton does not advertise (RFC 5321 §4.1.1.11).

use std::borrow::Cow;

use smtp_proto::{self as proto, Request};

use crate::address::{AddressError, validate_mailbox};
use crate::reply::Reply;

/// MAIL FROM `BODY=` value (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    Unspecified,
    SevenBit,
    EightBitMime,
}

/// DSN `RET=` (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

/// DSN `NOTIFY=` (RFC 3461 §4.1) as bits; empty means "not given" (the default, FAILURE+DELAY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify(pub u8);

impl Notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 2;
    pub const FAILURE: u8 = 4;
    pub const DELAY: u8 = 8;

    pub fn contains(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// NOTIFY= was given.
    pub fn is_given(self) -> bool {
        self.0 != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse-path; empty for the null sender `<>`.
    pub address: String,
    pub size: Option<u64>,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    pub address: String,
    pub notify: Notify,
    /// ORCPT address (type rfc822), decoded from xtext.
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// AUTH with its mechanism and initial response (empty when none was given).
    Auth {
        mechanism: AuthMechanism,
        initial: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
    /// Any mechanism Baton does not offer.
    Other,
}

/// Parses one command line. `line` must end with LF (a preceding CR is optional).
pub fn parse_command(line: &[u8]) -> Result<Command, Reply> {
    let mut iter = line.iter();
    let request = Request::parse(&mut iter).map_err(proto_error)?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::Lhlo { .. } => return Err(unrecognized()),
        Request::Mail { from } => Command::Mail(mail_from(from)?),
        Request::Rcpt { to } => Command::Rcpt(rcpt_to(to, line)?),
        Request::Data => Command::Data,
        Request::Bdat {
            chunk_size,
            is_last,
        } => Command::Bdat {
            size: chunk_size as u64,
            last: is_last,
        },
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Expn { .. } => Command::Expn,
        Request::Help { .. } => Command::Help,
        Request::StartTls => Command::StartTls,
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                proto::AUTH_PLAIN => AuthMechanism::Plain,
                proto::AUTH_LOGIN => AuthMechanism::Login,
                _ => AuthMechanism::Other,
            },
            initial: initial_response.into_owned(),
        },
        Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
            return Err(Reply::new(502, "5.5.1", "Command not implemented"));
        }
    })
}

fn unrecognized() -> Reply {
    Reply::new(500, "5.5.2", "Error: command not recognized")
}

fn proto_error(err: proto::Error) -> Reply {
    match err {
        proto::Error::UnknownCommand => unrecognized(),
        proto::Error::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
        proto::Error::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Bad recipient address syntax")
        }
        proto::Error::SyntaxError { syntax } => {
            Reply::new(501, "5.5.4", format!("Syntax: {syntax}"))
        }
        proto::Error::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid {param} parameter"))
        }
        proto::Error::UnsupportedParameter { param } => Reply::new(
            555,
            "5.5.4",
            format!("Unsupported parameter {}", printable(&param)),
        ),
        proto::Error::NeedsMoreData { .. } => {
            Reply::new(501, "5.5.2", "Syntax error: incomplete command")
        }
        proto::Error::ResponseTooLong | proto::Error::InvalidResponse { .. } => unrecognized(),
    }
}

fn unsupported(param: &str) -> Reply {
    Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
}

fn mail_from(from: proto::MailFrom<Cow<'_, str>>) -> Result<MailFrom, Reply> {
    // Parameters of extensions that Baton does not advertise.
    let unadvertised = [
        (
            from.flags & proto::MAIL_BODY_BINARYMIME != 0,
            "BODY=BINARYMIME",
        ),
        (from.flags & proto::MAIL_REQUIRETLS != 0, "REQUIRETLS"),
        (from.flags & proto::MAIL_CONPERM != 0, "CONPERM"),
        (from.by != 0, "BY"),
        (
            from.hold_for != 0 || from.hold_until != 0,
            "HOLDFOR/HOLDUNTIL",
        ),
        (from.mt_priority != 0, "MT-PRIORITY"),
        (from.trans_id.is_some(), "TRANSID"),
        (from.solicit.is_some(), "SOLICIT"),
        (from.mtrk.is_some(), "MTRK"),
        (from.auth.is_some(), "AUTH"),
    ];
    if let Some((_, name)) = unadvertised.iter().find(|(present, _)| *present) {
        return Err(unsupported(name));
    }
    let smtputf8 = from.flags & proto::MAIL_SMTPUTF8 != 0;
    let address = from.address.into_owned();
    if !address.is_empty() {
        validate_mailbox(&address, smtputf8).map_err(|e| address_reply(e, "5.1.7", "sender"))?;
    }
    let body = if from.flags & proto::MAIL_BODY_8BITMIME != 0 {
        BodyType::EightBitMime
    } else if from.flags & proto::MAIL_BODY_7BIT != 0 {
        BodyType::SevenBit
    } else {
        BodyType::Unspecified
    };
    let ret = if from.flags & proto::MAIL_RET_FULL != 0 {
        Some(Ret::Full)
    } else if from.flags & proto::MAIL_RET_HDRS != 0 {
        Some(Ret::Headers)
    } else {
        None
    };
    let envid = from.env_id.map(Cow::into_owned);
    if envid.as_deref().is_some_and(has_control) {
        // xtext can encode any octet; a decoded CR LF would end up in a DSN's header lines.
        return Err(Reply::new(501, "5.5.4", "Invalid ENVID parameter"));
    }
    Ok(MailFrom {
        address,
        size: (from.size != 0).then_some(from.size as u64),
        body,
        smtputf8,
        ret,
        envid,
    })
}

fn rcpt_to(to: proto::RcptTo<Cow<'_, str>>, line: &[u8]) -> Result<RcptTo, Reply> {
    if to.rrvs != 0 || to.flags & (proto::RCPT_CONNEG | proto::RCPT_RRVS_REJECT) != 0 {
        return Err(unsupported("RRVS/CONNEG"));
    }
    let mut address = to.address.into_owned();
    if address.is_empty() {
        // smtp-proto maps both `<>` and the bare `<Postmaster>` (RFC 5321 §4.5.1) to "".
        if contains_ignore_case(line, b"<postmaster>") {
            address = "postmaster".to_string();
        } else {
            return Err(Reply::new(501, "5.1.3", "Bad recipient address syntax"));
        }
    } else {
        // The recipient's own address never carries SMTPUTF8; the MAIL parameter decides,
        // which the session checks. Here only the syntax, with UTF-8 allowed.
        validate_mailbox(&address, true).map_err(|e| address_reply(e, "5.1.3", "recipient"))?;
    }
    let mut notify = 0;
    for (flag, bit) in [
        (proto::RCPT_NOTIFY_NEVER, Notify::NEVER),
        (proto::RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
        (proto::RCPT_NOTIFY_FAILURE, Notify::FAILURE),
        (proto::RCPT_NOTIFY_DELAY, Notify::DELAY),
    ] {
        if to.flags & flag != 0 {
            notify |= bit;
        }
    }
    let orcpt = to.orcpt.map(Cow::into_owned);
    if orcpt.as_deref().is_some_and(has_control) {
        return Err(Reply::new(501, "5.5.4", "Invalid ORCPT parameter"));
    }
    Ok(RcptTo {
        address,
        notify: Notify(notify),
        orcpt,
    })
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn address_reply(err: AddressError, status: &'static str, role: &str) -> Reply {
    match err {
        AddressError::NeedsSmtpUtf8 => Reply::new(
            553,
            "5.6.7",
            format!("Non-ASCII {role} address requires the SMTPUTF8 parameter"),
        ),
        other => Reply::new(501, status, format!("Bad {role} address syntax: {other}")),
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Keeps client-supplied text in replies and logs to printable ASCII.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Command, Reply> {
        parse_command(s.as_bytes())
    }

    #[test]
    fn mail_with_dsn_and_size() {
        let Command::Mail(m) =
            parse("MAIL FROM:<a@b.example> SIZE=1000 RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME\r\n")
                .unwrap()
        else {
            panic!("not MAIL")
        };
        assert_eq!(m.address, "a@b.example");
        assert_eq!(m.size, Some(1000));
        assert_eq!(m.ret, Some(Ret::Headers));
        assert_eq!(m.envid.as_deref(), Some("QQ+1"));
        assert_eq!(m.body, BodyType::EightBitMime);
    }

    #[test]
    fn null_sender() {
        let Command::Mail(m) = parse("MAIL FROM:<>\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(m.address, "");
    }

    #[test]
    fn rcpt_notify_orcpt() {
        let Command::Rcpt(r) =
            parse("RCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40y.example\r\n")
                .unwrap()
        else {
            panic!()
        };
        assert!(r.notify.contains(Notify::SUCCESS) && r.notify.contains(Notify::FAILURE));
        assert_eq!(r.orcpt.as_deref(), Some("x@y.example"));
        // xtext that decodes to a line break would forge DSN fields.
        let forged = parse("RCPT TO:<x@y.example> ORCPT=rfc822;x+0D+0AAction:+20delivered\r\n");
        assert_eq!(forged.unwrap_err().code, 501);
        let forged = parse("MAIL FROM:<a@b.example> ENVID=x+0D+0ABcc:+20c@d\r\n");
        assert_eq!(forged.unwrap_err().code, 501);
    }

    #[test]
    fn postmaster_without_domain() {
        let Command::Rcpt(r) = parse("RCPT TO:<Postmaster>\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(r.address, "postmaster");
        assert_eq!(parse("RCPT TO:<>\r\n").unwrap_err().status, "5.1.3");
    }

    #[test]
    fn errors_have_precise_codes() {
        assert_eq!(parse("FOO\r\n").unwrap_err().code, 500);
        assert_eq!(parse("MAIL TO:<a@b>\r\n").unwrap_err().code, 501);
        assert_eq!(
            parse("MAIL FROM:<a@b.c> BY=120;R\r\n").unwrap_err().code,
            555
        );
        assert_eq!(parse("MAIL FROM:<a@b.c> FOO=1\r\n").unwrap_err().code, 555);
        assert_eq!(parse("RCPT TO:<a@@b.c>\r\n").unwrap_err().status, "5.1.3");
        assert_eq!(parse("MAIL FROM:<ü@b.c>\r\n").unwrap_err().status, "5.6.7");
        assert!(parse("MAIL FROM:<ü@b.c> SMTPUTF8\r\n").is_ok());
    }

    #[test]
    fn bdat() {
        assert_eq!(
            parse("BDAT 100 LAST\r\n").unwrap(),
            Command::Bdat {
                size: 100,
                last: true
            }
        );
        assert_eq!(
            parse("BDAT 7\r\n").unwrap(),
            Command::Bdat {
                size: 7,
                last: false
            }
        );
        assert!(parse("BDAT x\r\n").is_err());
    }
}
