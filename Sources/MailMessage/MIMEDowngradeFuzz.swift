/// A libFuzzer-compatible driver for `MIMEDowngrade` (fuzz/run-mime-downgrade):
/// the first byte chooses the limits, the rest is the message. Invariants
/// are checked with `precondition`, so a violation crashes the fuzzer with
/// a finding:
///
/// - no trap on any input, and an error only of the documented kinds;
/// - a message without 8-bit bytes comes back byte for byte;
/// - without remarks, the output is all 7-bit; with none converted, it is
///   the input;
/// - the output is at most about 3.2 times the input (quoted-printable's
///   worst case plus the labels written);
/// - converting the output again changes nothing when it is 7-bit;
/// - every line the encoder wrote is at most 76 characters (lines copied
///   as they were may be longer) and none of them begins with "--".
///
///     @_cdecl("LLVMFuzzerTestOneInput")
///     func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
///         MIMEDowngradeFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size)); return 0
///     }
public enum MIMEDowngradeFuzz {
    public enum Outcome: Sendable, Equatable {
        case unchanged, converted(parts: Int), failed(MIMEDowngrade.Failure.Kind)
    }

    @discardableResult
    public static func run(data: UnsafeRawBufferPointer) -> Outcome {
        run(Array(data))
    }

    @discardableResult
    public static func run(_ bytes: [UInt8]) -> Outcome {
        guard let control = bytes.first else { return .unchanged }
        let input = Array(bytes.dropFirst())
        var limits = MIMEDowngrade.Limits()
        // Small limits now and then, so that each limit is reached.
        if control & 1 != 0 { limits.maximumDepth = Int(control >> 1 & 7) + 1 }
        if control & 16 != 0 { limits.maximumHeaderBytes = 64 }
        if control & 32 != 0 { limits.maximumBoundaryLength = 8 }
        let result: MIMEDowngrade.Result
        do {
            result = try MIMEDowngrade.convert(input, limits: limits)
        } catch {
            precondition(!error.reason.isEmpty, "a failure without a reason")
            precondition(MIMEDowngrade.has8Bit(input[...]), "a failure for a 7-bit message")
            return .failed(error.kind)
        }
        if !MIMEDowngrade.has8Bit(input[...]) {
            precondition(result.body == input && result.convertedParts == 0 && result.remarks.isEmpty,
                         "a 7-bit message changed")
        }
        if result.convertedParts == 0 { precondition(result.body == input, "nothing converted, yet changed") }
        if result.remarks.isEmpty { precondition(!MIMEDowngrade.has8Bit(result.body[...]), "8-bit left without a remark") }
        precondition(Set(result.remarks).count == result.remarks.count, "a remark twice")
        precondition(result.body.count <= input.count * 13 / 4 + 64 * (result.convertedParts + 1), "output unbounded")
        if !MIMEDowngrade.has8Bit(result.body[...]) {
            let again = try? MIMEDowngrade.convert(result.body, limits: limits)
            precondition(again?.body == result.body, "a 7-bit output changed when converted again")
        }
        if result.convertedParts > 0 { checkEncodedLines(input: input, output: result.body) }
        return result.convertedParts > 0 ? .converted(parts: result.convertedParts) : .unchanged
    }

    /// Lines of the output that are not lines of the input were written by
    /// the encoder (or are a rewritten Content-Transfer-Encoding field).
    /// Lines end at any CR or LF: the SMTP client sends each as CRLF.
    static func checkEncodedLines(input: [UInt8], output: [UInt8]) {
        func lines(_ bytes: [UInt8]) -> [ArraySlice<UInt8>] {
            bytes.split(omittingEmptySubsequences: true) { $0 == 10 || $0 == 13 }
        }
        let original = Set(lines(input))
        for text in lines(output) where !original.contains(text) {
            precondition(text.count <= 76 || text.starts(with: Array("Content-Transfer-Encoding:".utf8)),
                         "an encoded line over 76 characters")
            precondition(!text.starts(with: Array("--".utf8)), "an encoded line begins with --")
        }
    }
}
