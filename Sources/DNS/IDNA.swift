// Internationalized domain names for lookups: a domain in U-labels (as an
// SMTPUTF8 client may send it, RFC 6531) becomes the A-labels DNS holds
// ("bücher.example" -> "xn--bcher-kva.example"): each label with non-ASCII
// characters is case-folded, put in Unicode normalization form C and
// encoded with Punycode (RFC 3492) behind the "xn--" prefix (RFC 5890,
// RFC 5891 section 5). This is the lookup half of IDNA2008 without its
// per-character validity tables: a name they would refuse is converted
// anyway and then simply not found, which fails the same way.

import Foundation

public enum IDNA {
    /// The A-label form of `domain`, or nil when a label cannot be one (an
    /// empty label, a label over 63 octets once encoded, a name over 253).
    /// An all-ASCII name comes back unchanged, case included.
    public static func asciiDomain(_ domain: String) -> String? {
        guard domain.unicodeScalars.contains(where: { !$0.isASCII }) else { return domain }
        var labels: [String] = []
        let trailingDot = domain.hasSuffix(".")
        let body = trailingDot ? String(domain.dropLast()) : domain
        // IDNA2008 label separators: the full stop and its ideographic and
        // full-width forms (UTS #46 maps them; RFC 3490 named them).
        let separators: Set<Unicode.Scalar> = ["\u{2E}", "\u{3002}", "\u{FF0E}", "\u{FF61}"]
        var current = String.UnicodeScalarView()
        var rawLabels: [String] = []
        for scalar in body.unicodeScalars {
            if separators.contains(scalar) {
                rawLabels.append(String(current))
                current = String.UnicodeScalarView()
            } else {
                current.append(scalar)
            }
        }
        rawLabels.append(String(current))
        for raw in rawLabels {
            guard !raw.isEmpty else { return nil }
            if raw.unicodeScalars.allSatisfy(\.isASCII) {
                labels.append(raw)
                continue
            }
            let folded = raw.lowercased().precomposedStringWithCanonicalMapping
            guard let encoded = punycode(Array(folded.unicodeScalars.map(\.value))) else { return nil }
            let label = "xn--" + encoded
            guard label.utf8.count <= 63 else { return nil }
            labels.append(label)
        }
        let result = labels.joined(separator: ".") + (trailingDot ? "." : "")
        return result.utf8.count <= 253 + (trailingDot ? 1 : 0) ? result : nil
    }

    /// Punycode (RFC 3492 section 6.3) of one label's code points, without
    /// the prefix; nil on overflow.
    static func punycode(_ input: [UInt32]) -> String? {
        let base: UInt32 = 36, tMin: UInt32 = 1, tMax: UInt32 = 26
        func digit(_ d: UInt32) -> Character {
            Character(Unicode.Scalar(d < 26 ? d + 97 : d + 22)!)   // a-z, then 0-9
        }
        var output = ""
        for c in input where c < 0x80 { output.append(Character(Unicode.Scalar(c)!)) }
        let basicCount = UInt32(output.unicodeScalars.count)
        var handled = basicCount
        if basicCount > 0 { output.append("-") }
        var n: UInt32 = 128, delta: UInt32 = 0, bias: UInt32 = 72
        while handled < UInt32(input.count) {
            guard let m = input.filter({ $0 >= n }).min() else { return nil }
            let (step, o1) = (m - n).multipliedReportingOverflow(by: handled + 1)
            let (sum, o2) = delta.addingReportingOverflow(step)
            guard !o1, !o2 else { return nil }
            delta = sum
            n = m
            for c in input {
                if c < n {
                    let (d, o) = delta.addingReportingOverflow(1)
                    guard !o else { return nil }
                    delta = d
                }
                if c == n {
                    var q = delta
                    var k = base
                    while true {
                        let t = k <= bias ? tMin : (k >= bias + tMax ? tMax : k - bias)
                        if q < t { break }
                        output.append(digit(t + (q - t) % (base - t)))
                        q = (q - t) / (base - t)
                        k += base
                    }
                    output.append(digit(q))
                    bias = adapt(delta, handled + 1, first: handled == basicCount)
                    delta = 0
                    handled += 1
                }
            }
            delta += 1
            n += 1
        }
        return output
    }

    private static func adapt(_ delta: UInt32, _ points: UInt32, first: Bool) -> UInt32 {
        let base: UInt32 = 36, tMin: UInt32 = 1, tMax: UInt32 = 26, skew: UInt32 = 38, damp: UInt32 = 700
        var delta = first ? delta / damp : delta / 2
        delta += delta / points
        var k: UInt32 = 0
        while delta > ((base - tMin) * tMax) / 2 {
            delta /= base - tMin
            k += base
        }
        return k + (base - tMin + 1) * delta / (delta + skew)
    }
}
