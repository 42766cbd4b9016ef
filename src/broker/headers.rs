//! AMQP field-table values: writing a string, reading a string or an integer header of any of
//! the types producers use (AMQP 0-9-1 §4.2.5.5, field tables).

use lapin::{
    BasicProperties,
    types::{AMQPValue, LongString},
};

/// An AMQP long-string value (header or argument).
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A string header (long or short string); `None` when absent, of another type, or not UTF-8.
pub fn str_header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header (any AMQP integer type, or a decimal string) that fits a `u32`; `None`
/// otherwise.
pub fn int_header(props: &BasicProperties, name: &str) -> Option<u32> {
    let v = props.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match v {
        AMQPValue::ShortShortInt(i) => (*i).into(),
        AMQPValue::ShortShortUInt(i) => (*i).into(),
        AMQPValue::ShortInt(i) => (*i).into(),
        AMQPValue::ShortUInt(i) => (*i).into(),
        AMQPValue::LongInt(i) => (*i).into(),
        AMQPValue::LongUInt(i) => (*i).into(),
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        _ => return None,
    };
    u32::try_from(n).ok()
}
