// libFuzzer entry point for the SMTP client state machine.
//
// SMTPClientFuzz.run plays the server (its bytes, split anywhere), the TLS
// hand-off and the I/O layer's choices, and checks the client's invariants
// with `precondition`: a violation traps, and libFuzzer records the input.
// Built by fuzz/build, never by SwiftPM.
import SMTP

@_cdecl("LLVMFuzzerTestOneInput")
public func smtpClientFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    SMTPClientFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
