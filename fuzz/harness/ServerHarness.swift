// libFuzzer entry point for the SMTP server state machine.
//
// SMTPFuzz.run interprets the input as a policy, a split of the client's
// bytes and the answers of the queue, the password check and the TLS
// hand-off, and checks its invariants with `precondition`: a violation traps,
// and libFuzzer records the input. Built by fuzz/build, never by SwiftPM.
import SMTP

@_cdecl("LLVMFuzzerTestOneInput")
public func smtpServerFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    SMTPFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
