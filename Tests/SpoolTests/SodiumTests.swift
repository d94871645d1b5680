import Sodium
import Testing

@Suite struct SodiumTests {
    @Test func randomBytes() {
        let a = Sodium.randomBytes(32), b = Sodium.randomBytes(32)
        #expect(a.count == 32)
        #expect(a != b)
    }

    @Test func secretBoxRoundTripAndTamper() throws {
        let key = SecretKey()
        let box = SecretBox.seal(Array("hello".utf8), key: key)
        #expect(box.count == 5 + SecretBox.overhead)
        #expect(try SecretBox.open(box, key: key) == Array("hello".utf8))
        var bad = box
        bad[bad.count - 1] ^= 1
        #expect(throws: SodiumError.forged) { try SecretBox.open(bad, key: key) }
        #expect(throws: SodiumError.forged) { try SecretBox.open(box, key: SecretKey()) }
        #expect(throws: SodiumError.self) { try SecretBox.open(Array(box.prefix(10)), key: key) }
        #expect(try SecretBox.open(SecretBox.seal([], key: key), key: key) == [])

        let inner = SecretKey()
        let wrapped = SecretBox.seal(key: inner, under: key)
        let unwrapped = try SecretBox.openKey(wrapped, under: key)
        #expect(unwrapped.withUnsafeBytes { Array($0) } == inner.withUnsafeBytes { Array($0) })
        #expect(throws: SodiumError.self) { try SecretKey(bytes: [1, 2, 3]) }

        // A guarded key (the master key's sodium_malloc memory, read-only)
        // works as any other and is freed cleanly.
        let bytes = (0..<32).map { UInt8($0) }
        do {
            let guarded = try SecretKey(bytes: bytes, guarded: true)
            #expect(guarded.withUnsafeBytes { Array($0) } == bytes)
            let sealed = SecretBox.seal(key: inner, under: guarded)
            #expect(try SecretBox.openKey(sealed, under: try SecretKey(bytes: bytes)).withUnsafeBytes { Array($0) }
                    == inner.withUnsafeBytes { Array($0) })
        }
        #expect(throws: SodiumError.self) { try SecretKey(bytes: [1, 2, 3], guarded: true) }
    }

    private func encrypt(_ chunks: [[UInt8]], key: SecretKey) throws -> (header: [UInt8], chunks: [[UInt8]]) {
        let push = SecretStreamPush(key: key)
        var out: [[UInt8]] = []
        for (i, c) in chunks.enumerated() { out.append(try push.push(c, final: i == chunks.count - 1)) }
        #expect(push.isFinished)
        #expect(throws: SodiumError.afterFinal) { try push.push([1], final: true) }
        return (push.header, out)
    }

    private func decrypt(_ header: [UInt8], _ chunks: [[UInt8]], key: SecretKey) throws -> [UInt8] {
        let pull = try SecretStreamPull(key: key, header: header)
        var out: [UInt8] = []
        for c in chunks { out += try pull.pull(c).plaintext }
        try pull.finish()
        return out
    }

    @Test func secretStream() throws {
        let key = SecretKey()
        let plain: [[UInt8]] = [Array("one".utf8), [], Array("three".utf8)]
        let (header, chunks) = try encrypt(plain, key: key)
        #expect(try decrypt(header, chunks, key: key) == Array("onethree".utf8))
        // Truncation: a valid prefix without the final chunk.
        #expect(throws: SodiumError.truncated) { try decrypt(header, Array(chunks.dropLast()), key: key) }
        // Reordering, tampering, wrong key, wrong header.
        #expect(throws: SodiumError.forged) { try decrypt(header, [chunks[1], chunks[0], chunks[2]], key: key) }
        var bad = chunks
        bad[2][0] ^= 1
        #expect(throws: SodiumError.forged) { try decrypt(header, bad, key: key) }
        #expect(throws: SodiumError.forged) { try decrypt(header, chunks, key: SecretKey()) }
        var badHeader = header
        badHeader[0] ^= 1
        #expect(throws: SodiumError.forged) { try decrypt(badHeader, chunks, key: key) }
        // Anything after the final chunk.
        #expect(throws: SodiumError.afterFinal) { try decrypt(header, chunks + [chunks[2]], key: key) }
        #expect(throws: SodiumError.self) { try decrypt(header, [[1, 2]], key: key) }
    }
}
