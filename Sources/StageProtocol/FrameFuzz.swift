/// A libFuzzer-compatible driver for `FrameDecoder`, the gate every stage
/// puts in front of its sockets (the queue's inject socket is open to every
/// local user). Arbitrary bytes choose the protocol, the direction and how
/// the stream is cut; the rest is the stream. Invariants are checked with
/// `precondition`, so a violation crashes the fuzzer with a finding:
///
/// - decoding never traps, whatever the bytes;
/// - the stream cut into pieces decodes to the same frames and the same
///   error as the stream in one piece;
/// - every decoded frame encodes back to exactly the bytes it came from
///   (one wire form per frame: nothing skipped, nothing reinterpreted);
/// - every decoded frame passes the encoder's own checks and the schema in
///   force, and its required attributes read back with their types;
/// - an error sticks: the decoder refuses everything after it;
/// - DELIVER jobs assembled from the decoded frames keep their promises
///   (recipients, unique indexes, the size limit).
///
/// A fuzz executable only needs:
///
///     @_cdecl("LLVMFuzzerTestOneInput")
///     func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
///         FrameFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size)); return 0
///     }
public enum FrameFuzz {
    /// What one run observed (for tests).
    public struct Outcome: Sendable, Equatable {
        public var frames = 0
        public var error: ProtocolError?
        public var jobs = 0
    }

    /// The first byte of an input: which decoder, and how to cut the stream.
    /// Bits 0-2: 1-4 a protocol of version 1 (ProtocolName.allCases), 5 the
    /// certificate channel (no HELLO, server to client), else none (the
    /// peer's HELLO names it); bit 3: server to client; bit 4: the HELLOs
    /// were exchanged before (a pooled connection); bits 5-7: the cut.
    public struct Control: Sendable {
        /// nil: the peer's HELLO names the protocol.
        public var schema: ProtocolSchema?
        public var direction: Direction
        public var afterHello: Bool
        /// 0-7: how the second decoding cuts the stream.
        public var cut: UInt8

        public init(_ byte: UInt8) {
            let names = ProtocolName.allCases
            let choice = Int(byte & 7)
            direction = byte & 8 == 0 ? .clientToServer : .serverToClient
            cut = byte >> 5
            if choice >= 1 && choice <= names.count {
                schema = .standard(names[choice - 1])
                afterHello = byte & 16 != 0
            } else if choice == names.count + 1 {
                schema = .certificates
                direction = .serverToClient
                afterHello = true
            } else {
                schema = nil
                afterHello = false
            }
        }

        func decoder() -> FrameDecoder {
            if let schema { return FrameDecoder(schema: schema, direction: direction, afterHello: afterHello) }
            return FrameDecoder(protocol: nil, direction: direction)
        }
    }

    /// Largest body a fuzzed DELIVER job may hold before it is `oversized`.
    static let jobSizeLimit = 100

    @discardableResult
    public static func run(data: UnsafeRawBufferPointer) -> Outcome {
        run(Array(data))
    }

    @discardableResult
    public static func run(_ input: [UInt8]) -> Outcome {
        guard let first = input.first else { return Outcome() }
        let control = Control(first)
        let stream = Array(input.dropFirst())
        // In one piece, checking each frame as it comes.
        var whole = control.decoder()
        whole.append(stream)
        var frames: [Frame] = []
        var error: ProtocolError?
        var reencoded: [UInt8] = []
        var assembler = DeliveryJobAssembler(maximumMessageSize: jobSizeLimit)
        var jobs = 0
        var assemblerFailed = false
        while true {
            let schemaBefore = whole.schema
            let frame: Frame?
            do {
                frame = try whole.next()
            } catch let e {
                error = e
                break
            }
            guard let frame else { break }
            frames.append(frame)
            checkFrame(frame, schema: frame.type == .error && schemaBefore == nil ? nil : whole.schema,
                       direction: control.direction)
            FrameEncoder.encode(withDescriptors(frame), into: &reencoded)
            precondition(whole.consumedBytes == UInt64(reencoded.count),
                         "consumedBytes \(whole.consumedBytes) after frames that encode to \(reencoded.count) bytes")
            if whole.protocolName == .deliver, control.direction == .serverToClient, !assemblerFailed,
               [.job, .jobRcpt, .body, .jobEnd].contains(frame.type) {
                do {
                    if let job = try assembler.add(frame) {
                        jobs += 1
                        checkJob(job)
                    }
                } catch {
                    assemblerFailed = true   // the stage would close the connection
                }
            }
        }
        precondition(reencoded == Array(stream.prefix(reencoded.count)),
                     "decoded frames do not encode back to the bytes they came from")
        if let error {
            // Sticky: the same error again, even with more bytes.
            whole.append([0, 0, 0, 2, 0, 1])
            do {
                _ = try whole.next()
                preconditionFailure("the decoder decoded again after \(error.message)")
            } catch let again {
                precondition(again == error, "a second error \(again.message) after \(error.message)")
            }
        } else {
            precondition(whole.bufferedByteCount == stream.count - reencoded.count,
                         "\(whole.bufferedByteCount) bytes buffered, \(stream.count - reencoded.count) left over")
        }

        // In pieces: the same frames, the same error.
        var pieces = control.decoder()
        var piecewise: [Frame] = []
        var piecewiseError: ProtocolError?
        var offset = 0
        var step = 0
        decoding: while offset < stream.count {
            let size = pieceSize(stream, at: offset, step: step, cut: control.cut)
            pieces.append(stream[offset..<min(stream.count, offset + size)])
            offset += size
            step += 1
            while true {
                do {
                    guard let frame = try pieces.next() else { break }
                    piecewise.append(frame)
                } catch let e {
                    piecewiseError = e
                    break decoding
                }
            }
        }
        precondition(piecewise == frames, "\(piecewise.count) frames in pieces, \(frames.count) in one piece")
        precondition(piecewiseError == error,
                     "in pieces: \(piecewiseError?.message ?? "no error"); in one piece: \(error?.message ?? "no error")")
        return Outcome(frames: frames.count, error: error, jobs: jobs)
    }

    /// Piece sizes from 1 byte to past a frame header, varied by the bytes
    /// themselves, so that every split point of a frame gets tried.
    static func pieceSize(_ stream: [UInt8], at offset: Int, step: Int, cut: UInt8) -> Int {
        switch cut {
        case 0: return 1
        case 1: return 2 + step % 5
        case 2: return 3 + Int(stream[offset] % 7)
        case 3: return step % 2 == 0 ? 4 : 2
        case 4: return 1 + Int(stream[offset] % 64)
        case 5: return 5 + step % 11
        case 6: return 6
        default: return max(1, stream.count / 2)
        }
    }

    /// The frame as a sender would hold it: `fd` attributes decode as -1
    /// (the descriptor travels out of band) but are sent as descriptors.
    static func withDescriptors(_ frame: Frame) -> Frame {
        var copy = frame
        for i in copy.attributes.indices where copy.attributes[i].value == .fd(-1) {
            copy.attributes[i].value = .fd(0)
        }
        return copy
    }

    static func checkFrame(_ frame: Frame, schema: ProtocolSchema?, direction: Direction) {
        let sendable = withDescriptors(frame)
        do {
            try FrameEncoder.checkFraming(sendable)
        } catch {
            preconditionFailure("decoded \(frame.type.name) fails the encoder's framing check: \(error.message)")
        }
        guard let schema else { return }
        do {
            try schema.validate(sendable, direction: direction)
        } catch {
            preconditionFailure("decoded \(frame.type.name) fails the schema \(schema.name): \(error.message)")
        }
        guard let rule = schema.rules(direction)[frame.type] else {
            preconditionFailure("decoded \(frame.type.name), which protocol \(schema.name) does not allow")
        }
        for attribute in rule.attributes.values where attribute.required {
            do {
                switch attribute.type {
                case .uint: _ = try frame.uint(attribute.name)
                case .text: _ = try frame.text(attribute.name)
                case .bytes: _ = try frame.bytes(attribute.name)
                case .bool: _ = try frame.bool(attribute.name, default: false)
                case .fd: _ = try frame.fd(attribute.name)
                }
            } catch {
                preconditionFailure("decoded \(frame.type.name): required \(attribute.name) does not read back: \(error.message)")
            }
        }
    }

    static func checkJob(_ job: DeliveryJob) {
        precondition(!job.recipients.isEmpty, "job \(job.job) without recipients")
        precondition(Set(job.recipients.map(\.index)).count == job.recipients.count, "job \(job.job): an index twice")
        let held = job.body.reduce(0) { $0 + $1.count }
        if job.oversized {
            precondition(held == 0, "oversized job \(job.job) still holds \(held) bytes")
        } else {
            precondition(held <= jobSizeLimit, "job \(job.job) holds \(held) bytes, over the limit of \(jobSizeLimit)")
        }
    }
}
