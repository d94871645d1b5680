/// SMTP: the protocol machinery of Sealpost's SMTP stages, with no I/O.
///
/// - `SMTPServerSession`: the ESMTP server (RFC 5321 and extensions) as a
///   state machine fed with bytes, returning `SMTPAction`s.
/// - `SMTPPathParser`, `SMTPMailbox`, `SMTPPath`: envelope addresses.
/// - `RelayPolicy`: relay control as a pure decision.
/// - `ReceivedHeader`: the trace field smtp-listen prepends.
/// - `SMTPFuzz`: a libFuzzer-style entry point that checks invariants.
public enum SMTPModule {
    public static let version = "1"
}

extension String {
    /// The bytes as a string when they are valid UTF-8, else nil, as
    /// `String(validating:as: UTF8.self)` answers. That initializer runs
    /// the standard library's unspecialized generic validation (two type
    /// metadata lookups and a transcoding loop, about 900 instructions a
    /// call, a dozen calls per message in smtp-listen); all-ASCII bytes,
    /// nearly every address and domain, take the specialized decoding.
    /// (StageProtocol has the same few lines: each module is compiled on
    /// its own for the fuzzers, fuzz/build, so neither can lend it.)
    init?(validatingUTF8Bytes bytes: ArraySlice<UInt8>) {
        if bytes.allSatisfy({ $0 < 0x80 }) {
            self = String(decoding: bytes, as: UTF8.self)
        } else if let text = String(validating: bytes, as: UTF8.self) {
            self = text
        } else {
            return nil
        }
    }
}
