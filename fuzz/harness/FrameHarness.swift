// libFuzzer entry point for the stage protocol's frame decoder.
//
// FrameFuzz.run interprets the first byte as the protocol, the direction
// and a way of cutting the stream, the rest as the stream a stage reads
// from its socket, and checks its invariants with `precondition`: a
// violation traps, and libFuzzer records the input. Built by fuzz/build,
// never by SwiftPM.
import StageProtocol

@_cdecl("LLVMFuzzerTestOneInput")
public func stageFramesFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FrameFuzz.run(data: UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
