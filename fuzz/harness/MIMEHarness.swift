// libFuzzer entry point for the 8-bit to 7-bit MIME conversion.
//
// MIMEDowngradeFuzz.run converts the input (its first byte chooses the
// limits) and checks the conversion's invariants with `precondition`: a
// violation traps, and libFuzzer records the input. Built by fuzz/build,
// never by SwiftPM.
import MailMessage

@_cdecl("LLVMFuzzerTestOneInput")
public func mimeDowngradeFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    MIMEDowngradeFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
