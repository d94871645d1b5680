/// Table tests of the strict RDATA decoders: well-formed records decode,
/// malformed ones (truncated, overlong labels, compression pointers, trailing
/// bytes) are refused.
import Testing
@testable import DNS

/// Wire form of a dotted name.
func wire(_ name: String) -> [UInt8] {
    name.split(separator: ".").flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } + [0]
}

struct RDataCase: CustomTestStringConvertible, Sendable {
    var label: String
    var rdata: [UInt8]
    var testDescription: String { label }
}

let malformedMX: [RDataCase] = [
    RDataCase(label: "empty", rdata: []),
    RDataCase(label: "preference only, half", rdata: [0]),
    RDataCase(label: "preference without name", rdata: [0, 10]),
    RDataCase(label: "label runs past end", rdata: [0, 10, 5, 0x6D, 0x78]),
    RDataCase(label: "no terminating root label", rdata: [0, 10, 2, 0x6D, 0x78]),
    RDataCase(label: "compression pointer", rdata: [0, 10, 0xC0, 0x0C]),
    RDataCase(label: "pointer after a label", rdata: [0, 10, 2, 0x6D, 0x78, 0xC0, 0x0C]),
    RDataCase(label: "label length 64 (0x40)", rdata: [0, 10, 0x40] + Array(repeating: 0x61, count: 64) + [0]),
    RDataCase(label: "extended label type 0x41", rdata: [0, 10, 0x41, 0]),
    RDataCase(label: "trailing byte", rdata: [0, 10] + wire("mx.example") + [0]),
    RDataCase(label: "name over 255 octets",
              rdata: [0, 10] + Array((0..<5).map { _ in [63] + Array(repeating: UInt8(0x61), count: 63) }.joined()) + [0]),
]

let malformedTXT: [RDataCase] = [
    RDataCase(label: "empty rdata", rdata: []),
    RDataCase(label: "string longer than rdata", rdata: [5, 0x61, 0x62]),
    RDataCase(label: "second string truncated", rdata: [1, 0x61, 3, 0x62]),
]

let malformedTLSA: [RDataCase] = [
    RDataCase(label: "empty", rdata: []),
    RDataCase(label: "usage only", rdata: [3]),
    RDataCase(label: "no matching type", rdata: [3, 1]),
    RDataCase(label: "no association data", rdata: [3, 1, 1]),
]

@Suite struct RDataTests {
    @Test func mxDecodes() throws {
        let record = try MXRecord(rdata: [0, 10] + wire("mx1.dane.test"))
        #expect(record.preference == 10)
        #expect(record.exchange.text == "mx1.dane.test")
        #expect(record.exchange.isHostname)
        #expect(!record.exchange.isRoot)
        let big = try MXRecord(rdata: [0xFF, 0xFE] + wire("a"))
        #expect(big.preference == 65534)
    }

    @Test func nullMXDecodesAsRoot() throws {
        let record = try MXRecord(rdata: [0, 0, 0])
        #expect(record.exchange.isRoot)
        #expect(record.exchange.text == ".")
        #expect(!record.exchange.isHostname)
    }

    @Test func longestNameIsAccepted() throws {
        // 3 x 63 + 61 label octets + 4 length octets + root = 255.
        let labels: [[UInt8]] = [63, 63, 63, 61].map { Array(repeating: UInt8(0x61), count: $0) }
        let name: [UInt8] = labels.flatMap { (label: [UInt8]) -> [UInt8] in [UInt8(label.count)] + label } + [0]
        #expect(name.count == 255)
        let decoded = try DomainName.decode(wire: name)
        #expect(decoded.labels == labels)
        // One octet more (256 with a label in front) is refused.
        let longer: [UInt8] = [UInt8(62)] + Array(repeating: UInt8(0x61), count: 62) + Array(name.dropFirst(64))
        #expect(longer.count + 2 == 256)
        #expect(throws: RDataError.self) { try DomainName.decode(wire: [1, 0x62] + longer) }
    }

    @Test(arguments: malformedMX) func malformedMXIsRefused(_ c: RDataCase) {
        #expect(throws: RDataError.self) { try MXRecord(rdata: c.rdata) }
    }

    @Test func pointerErrorSaysSo() {
        do {
            _ = try MXRecord(rdata: [0, 10, 0xC0, 0x0C])
            Issue.record("accepted a compression pointer")
        } catch {
            #expect(error.reason.contains("compression pointer"))
            #expect(error.type == .mx)
        }
    }

    @Test func oddLabelBytesAreEscaped() throws {
        let name = try DomainName.decode(wire: [3, 0x61, 0x2E, 0x62, 2, 0x20, 0xFF, 0])
        #expect(name.text == "a\\.b.\\032\\255")
        #expect(!name.isHostname)
        let hyphen = try DomainName.decode(wire: wire("-bad.example"))
        #expect(!hyphen.isHostname)
    }

    @Test func addresses() throws {
        #expect(try IPv4Address(rdata: [127, 0, 0, 21]).description == "127.0.0.21")
        #expect(throws: RDataError.self) { try IPv4Address(rdata: [127, 0, 0]) }
        #expect(throws: RDataError.self) { try IPv4Address(rdata: [127, 0, 0, 1, 0]) }
        var v6 = [UInt8](repeating: 0, count: 16)
        v6[15] = 1
        #expect(try IPv6Address(rdata: v6).description == "::1")
        let doc: [UInt8] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x27]
        #expect(try IPv6Address(rdata: doc).description == "2001:db8::27")
        let noRun: [UInt8] = [0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8]
        #expect(try IPv6Address(rdata: noRun).description == "1:2:3:4:5:6:7:8")
        let twoRuns: [UInt8] = [0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]
        #expect(try IPv6Address(rdata: twoRuns).description == "1:0:0:2::3")
        #expect(throws: RDataError.self) { try IPv6Address(rdata: Array(v6.dropLast())) }
    }

    @Test func tlsaDecodes() throws {
        let digest = [UInt8](repeating: 0xAB, count: 32)
        let record = try TLSARecord(rdata: [3, 1, 1] + digest)
        #expect(record == TLSARecord(usage: 3, selector: 1, matchingType: 1, data: digest))
        #expect(record.dataHex == String(repeating: "ab", count: 32))
    }

    @Test(arguments: malformedTLSA) func malformedTLSAIsRefused(_ c: RDataCase) {
        #expect(throws: RDataError.self) { try TLSARecord(rdata: c.rdata) }
    }

    @Test func txtKeepsStringsAndJoins() throws {
        let record = try TXTRecord(rdata: [9] + Array("v=STSv1; ".utf8) + [0] + [3] + Array("id;".utf8))
        #expect(record.strings.map { String(decoding: $0, as: UTF8.self) } == ["v=STSv1; ", "", "id;"])
        #expect(record.text == "v=STSv1; id;")
        let invalid = try TXTRecord(rdata: [1, 0xFF])
        #expect(invalid.text == nil)
        #expect(invalid.joined == [0xFF])
    }

    @Test(arguments: malformedTXT) func malformedTXTIsRefused(_ c: RDataCase) {
        #expect(throws: RDataError.self) { try TXTRecord(rdata: c.rdata) }
    }

    @Test func answerAccessorsCheckTypeAndStatus() throws {
        let mx = DNSAnswer(name: "example", type: .mx, rcode: .noError, status: .secure, haveData: true,
                           nxDomain: false, canonicalName: nil, ttl: 60, rdata: [[0, 5] + wire("mx.example")])
        #expect(try mx.mxRecords().map(\.description) == ["5 mx.example"])
        #expect(throws: DNSError.self) { try mx.tlsaRecords() }
        var bogus = mx
        bogus.status = .bogus(reason: "signature crypto failed")
        #expect(throws: DNSError.bogus(name: "example", type: .mx, reason: "signature crypto failed")) {
            try bogus.mxRecords()
        }
        var broken = mx
        broken.rdata.append([0, 5, 0xC0, 0x0C])
        #expect(throws: DNSError.self) { try broken.mxRecords() }
    }

    @Test(arguments: ["", ".", "a..b", "exa mple.org", "b\\046c.org", "bücher.example",
                      String(repeating: "a", count: 64) + ".org",
                      Array(repeating: "abcdefghi", count: 26).joined(separator: ".")])
    func invalidQueryNamesAreRefused(_ name: String) {
        #expect(throws: DNSError.self) { try DNSName.validate(name) }
    }

    @Test(arguments: ["dane.test", "dane.test.", "_25._tcp.mx1.dane.test", "xn--bcher-kva.example"])
    func validQueryNamesAreAccepted(_ name: String) throws {
        try DNSName.validate(name)
    }

    @Test func pollMilliseconds() {
        #expect(Resolver.milliseconds(.zero) == 0)
        #expect(Resolver.milliseconds(.seconds(-1)) == 0)
        #expect(Resolver.milliseconds(.microseconds(1)) == 1)
        #expect(Resolver.milliseconds(.milliseconds(1500)) == 1500)
    }
}
