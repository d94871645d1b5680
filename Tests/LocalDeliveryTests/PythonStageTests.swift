// The Python stand-in for local-deliver (Tests/PipelineTests/Fixtures/
// deliver.py, written from PROTOCOL.md alone) checked against the strict
// Swift decoder of StageProtocol: a real python3 process, a real socket.

import Testing
import Foundation
import StageProtocol
@testable import LocalDelivery

@Suite struct PythonStageTests {
    static let script = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("PipelineTests/Fixtures/deliver.py").path

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")))
    func deliverPySpeaksTheProtocol() throws {
        let dir = TemporaryDirectory()
        try FileManager.default.createDirectory(atPath: dir.file("run"), withIntermediateDirectories: true)
        let listener = try Listener(path: dir.file("run/deliver"))

        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [Self.script, dir.file("run/deliver")]
        process.environment = ["PATH": "/usr/bin:/bin"]
        #expect(FileManager.default.createFile(atPath: dir.file("stderr"), contents: nil))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: dir.file("stderr")))
        try process.run()
        defer {
            // SIGKILL: Foundation's Process passes on the test runner's
            // blocked-signal mask, so a SIGTERM could stay pending forever.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }

        let c = try listener.accept(.deliver)
        let hello = try #require(try c.receive())
        #expect(try hello.text("protocol") == "deliver")
        #expect(try hello.uint("version") == 1)
        #expect(try hello.text("transport") == "local")
        try c.send(Frame(.hello, ["protocol": .text("deliver"), "version": .uint(1)]))

        try c.send(Frame(.job, attributes: [
            ("job", .uint(42)), ("queue-id", .text("0123456789AB")), ("sender", .text("s@example.net")),
            ("arrival", .uint(UInt64(Date().timeIntervalSince1970))), ("size", .uint(30)), ("attempt", .uint(1)),
        ]))
        try c.send(Frame(.jobRcpt, ["index": .uint(0), "address": .text("Alice+x@localhost")]))
        try c.send(Frame(.jobRcpt, ["index": .uint(1), "address": .text("bob@localhost")]))
        try c.send(Frame(.body, ["data": .bytes(Array("Subject: py\r".utf8))]))
        try c.send(Frame(.body, ["data": .bytes(Array("\n\r\nhello\r\n".utf8))]))
        try c.send(Frame(.jobEnd, ["job": .uint(42)]))

        var statuses: [UInt64: String] = [:]
        while true {
            let frame = try #require(try c.receive())
            if frame.type == .jobDone {
                #expect(try frame.uint("job") == 42)
                break
            }
            #expect(frame.type == .result)
            #expect(try frame.uint("job") == 42)
            statuses[try frame.uint("index")] = try frame.text("status")
        }
        #expect(statuses == [0: "sent", 1: "sent"])
        c.close()

        for user in ["alice", "bob"] {
            let new = dir.file("mail/\(user)/Maildir/new")
            let files = listDirectory(new)
            #expect(files.count == 1)
            #expect(listDirectory(dir.file("mail/\(user)/Maildir/tmp")).isEmpty)
            let text = files.first.map { readText(new + "/" + $0) } ?? ""
            #expect(text.hasPrefix("Return-Path: <s@example.net>\n"))
            #expect(text.hasSuffix("Subject: py\n\nhello\n"))
        }
    }
}
