import Foundation
import Testing
import StageProtocol

/// The committed seeds of the stage-frames fuzz target (fuzz/corpus/
/// stage-frames, written by fuzz/make-seeds), replayed through the driver
/// the fuzzer runs: each keeps the invariants (a violation traps) and still
/// decodes as far as it was written to, so that libFuzzer starts from whole
/// conversations rather than from a first HELLO that no longer decodes.
@Suite struct FrameFuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz/corpus/stage-frames")

    /// Seed name: (frames decoded, delivery jobs assembled, the error's start or nil).
    static let expected: [String: (frames: Int, jobs: Int, error: String?)] = [
        "inject-client": (9, 0, nil), "inject-pooled": (5, 0, nil), "inject-server": (5, 0, nil),
        "deliver-jobs": (12, 2, nil), "deliver-results": (4, 0, nil), "control-requests": (4, 0, nil),
        "control-answers": (5, 0, nil), "tls-negotiate": (3, 0, nil), "certificates": (2, 0, nil),
        "inject-before-hello": (0, 0, "MAIL: not allowed before HELLO"),
        "inject-truncated": (1, 0, "RCPT: attribute name runs past the end"),
    ]

    @Test func everySeedDecodesAsFarAsItWasWrittenTo() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).filter { $0.hasSuffix(".bin") }
        #expect(Set(files.map { String($0.dropLast(4)) }) == Set(Self.expected.keys), "fuzz/make-seeds and this list differ")
        for file in files {
            let name = String(file.dropLast(4))
            let data = try #require(FileManager.default.contents(atPath: Self.corpus.appendingPathComponent(file).path))
            let outcome = FrameFuzz.run([UInt8](data))
            let want = try #require(Self.expected[name])
            #expect(outcome.frames == want.frames, "\(name): frames")
            #expect(outcome.jobs == want.jobs, "\(name): jobs")
            if let error = want.error {
                #expect(outcome.error?.message.hasPrefix(error) == true, "\(name): \(outcome.error?.message ?? "no error")")
            } else {
                #expect(outcome.error == nil, "\(name): \(outcome.error?.message ?? "")")
            }
        }
    }

    /// Every cut of a whole conversation: the driver's own piecewise
    /// decoding, run here over all eight ways of cutting.
    @Test func everyCutOfEverySeedAgrees() throws {
        for file in try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path) where file.hasSuffix(".bin") {
            let data = try #require(FileManager.default.contents(atPath: Self.corpus.appendingPathComponent(file).path))
            var input = [UInt8](data)
            let first = FrameFuzz.run(input)
            for cut in 0..<8 as Range<UInt8> {
                input[0] = input[0] & 0x1F | cut << 5
                #expect(FrameFuzz.run(input) == first, "\(file), cut \(cut)")
            }
        }
    }

    /// The checks can fail: a frame whose bytes do not match its wire form
    /// would be caught. Here a stream the decoder must refuse (a uint of 7
    /// bytes) is refused with the rule it breaks, cut or not.
    @Test func aMalformedValueIsRefusedWhereverTheStreamIsCut() {
        // HELLO (type 1) with one attribute: "version", uint (1), length 7.
        var frame: [UInt8] = [0, 1] + [7] + Array("version".utf8) + [1, 0, 0, 0, 7] + [UInt8](repeating: 0, count: 7)
        frame = [0, 0, 0, UInt8(frame.count)] + frame
        for cut in 0..<8 as Range<UInt8> {
            let outcome = FrameFuzz.run([cut << 5] + frame)
            #expect(outcome.frames == 0)
            #expect(outcome.error?.message == "HELLO: attribute \"version\": uint value length is 7, must be 8")
        }
    }
}
