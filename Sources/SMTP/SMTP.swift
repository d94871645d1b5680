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
