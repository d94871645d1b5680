// A-labels for lookups (RFC 3492 Punycode, RFC 5891): the samples of the
// RFCs and the IANA IDN test domains.

import Testing
@testable import DNS

@Suite struct IDNATests {
    @Test func punycodeSamplesOfRFC3492() {
        func encode(_ s: String) -> String? { IDNA.punycode(s.unicodeScalars.map(\.value)) }
        #expect(encode("bücher") == "bcher-kva")
        #expect(encode("münchen") == "mnchen-3ya")
        // RFC 3492 7.1 (L): 3<nen>B<gumi><kinpachi><sensei>
        #expect(encode("3年B組金八先生") == "3B-ww4c5e180e575a65lsy2b")
        // (A) Arabic (Egyptian)
        #expect(encode("\u{0644}\u{064A}\u{0647}\u{0645}\u{0627}\u{0628}\u{062A}\u{0643}\u{0644}\u{0645}\u{0648}\u{0634}\u{0639}\u{0631}\u{0628}\u{064A}\u{061F}")
                == "egbpdaj6bu4bxfgehfvwxn")
    }

    @Test func domainsBecomeALabels() {
        #expect(IDNA.asciiDomain("bücher.example") == "xn--bcher-kva.example")
        #expect(IDNA.asciiDomain("BÜCHER.example") == "xn--bcher-kva.example")
        #expect(IDNA.asciiDomain("例え.テスト") == "xn--r8jz45g.xn--zckzah")
        // The ideographic full stop separates labels too.
        #expect(IDNA.asciiDomain("bücher\u{3002}example") == "xn--bcher-kva.example")
        // Normalization form C: u + combining diaeresis is ü.
        #expect(IDNA.asciiDomain("bu\u{0308}cher.example") == "xn--bcher-kva.example")
        // ASCII names are left exactly as they are.
        #expect(IDNA.asciiDomain("Example.ORG") == "Example.ORG")
        #expect(IDNA.asciiDomain("bücher..example") == nil)
        #expect(IDNA.asciiDomain(String(repeating: "ü", count: 70) + ".example") == nil)
    }
}
