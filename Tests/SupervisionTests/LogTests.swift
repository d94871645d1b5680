import Glibc
import Testing
@testable import Supervision

@Suite struct LineAssemblerTests {
    @Test func splitsLinesAndKeepsPartialOnes() {
        var assembler = LineAssembler(maximumLength: 100)
        #expect(assembler.append(Array("one\ntw".utf8)) == [Array("one".utf8)])
        #expect(assembler.hasPartialLine)
        #expect(assembler.append(Array("o\n\nthree".utf8)) == [Array("two".utf8), []])
        #expect(assembler.finish() == Array("three".utf8))
        #expect(assembler.finish() == nil)
    }

    @Test func byteAtATimeGivesTheSameLines() {
        var assembler = LineAssembler(maximumLength: 100)
        var lines: [[UInt8]] = []
        for byte in Array("a b\nc\n".utf8) { lines += assembler.append([byte]) }
        #expect(lines == [Array("a b".utf8), Array("c".utf8)])
    }

    @Test func splitsOverlongLines() {
        var assembler = LineAssembler(maximumLength: 4)
        let lines = assembler.append(Array("abcdefghij\n".utf8))
        #expect(lines == [Array("abcd".utf8), Array("efgh".utf8), Array("ij".utf8)])
    }
}

@Suite struct LogFormatTests {
    @Test func keepsAProgramPrefixAndAddsOneOtherwise() {
        #expect(LogFormat.stageLine(Array("queue[812]: 0A1B: from=<a>".utf8), stage: "queue", pid: 9)
            == "queue[812]: 0A1B: from=<a>")
        #expect(LogFormat.stageLine(Array("Traceback (most recent call last):".utf8), stage: "local-deliver", pid: 9)
            == "local-deliver[9]: Traceback (most recent call last):")
        #expect(LogFormat.stageLine(Array("x[12] no colon".utf8), stage: "s", pid: 1) == "s[1]: x[12] no colon")
        // Another program's name is no disguise: the writer's goes in front.
        #expect(LogFormat.stageLine(Array("queue[812]: 0A1B: removed".utf8), stage: "smtp-listen", pid: 7)
            == "smtp-listen[7]: queue[812]: 0A1B: removed")
        #expect(LogFormat.stageLine(Array("queue-inject[5]: x".utf8), stage: "queue", pid: 7)
            == "queue[7]: queue-inject[5]: x")
    }

    @Test func neutralisesControlBytes() {
        #expect(LogFormat.stageLine([0x61, 0x1b, 0x62, 0x09, 0x63, 0x0d], stage: "s", pid: 1) == "s[1]: a?b\tc")
    }

    @Test func hostnameIsTheFirstLabel() {
        #expect(LogFormat.shortHostname("mx.example.org") == "mx")
        #expect(LogFormat.shortHostname("") == "localhost")
    }

    @Test func timestampLooksLikeSyslog() {
        let stamp = LogFormat.timestamp(0)
        #expect(stamp.count == 15)
        #expect(stamp.split(separator: ":").count == 3)
    }
}

@Suite struct BackoffTests {
    @Test func doublesUpToAMinuteAndStartsOverAfterAHealthyRun() {
        var backoff = Backoff()
        let delays = (0..<8).map { _ in backoff.delayAfterExit(uptime: 0.5) }
        #expect(delays == [1, 2, 4, 8, 16, 32, 60, 60])
        #expect(backoff.delayAfterExit(uptime: 61) == 1)
        #expect(backoff.delayAfterExit(uptime: 3) == 2)
    }
}

@Suite struct LayoutTests {
    @Test func mailDirectoryIsTheTemplateUpToTheUser() {
        let layout = DirectoryLayout(dataDirectory: "/d", runtimeDirectory: "/d/run", spoolDirectory: "/d/queue",
                                     logDirectory: "/d/log", localRecipientTable: "/d/local/recipients",
                                     mailboxTemplate: "mail/{user}/Maildir")
        #expect(layout.mailDirectory == "/d/mail")
        #expect(layout.pidFile == "/d/supervise/supervise.pid")
        #expect(DirectoryLayout.mailDirectory(dataDirectory: "/d", template: "{user}/Maildir") == nil)
        #expect(DirectoryLayout.mailDirectory(dataDirectory: "/d", template: "/home/{user}/Maildir") == nil)
        #expect(DirectoryLayout.mailDirectory(dataDirectory: "/d", template: "boxes/all/{user}") == "/d/boxes/all")
    }
}

/// The log file's mode: it names every sender and recipient.
@Suite struct LogSinkModeTests {
    private func temporaryDirectory() throws -> String {
        var template = Array("/tmp/sealpost-logsink-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw SystemError("mkdtemp") }
        return String(cString: p)
    }

    private func mode(_ path: String) -> mode_t {
        var info = stat()
        _ = stat(path, &info)
        return info.st_mode & 0o7777
    }

    @Test func aNewLogIsNotReadableByOthers() throws {
        let dir = try temporaryDirectory()
        defer { _ = unlink(dir + "/sealpost.log"); _ = rmdir(dir) }
        let sink = LogSink(path: dir + "/sealpost.log", hostname: "mx.example.test", echo: false)
        try sink.open()
        sink.write("queue[1]: a line")
        // 0640 less the umask (not changed here: it is the process's).
        #expect(mode(dir + "/sealpost.log") & ~0o640 == 0)
        #expect(mode(dir + "/sealpost.log") & 0o600 == 0o600)
    }

    @Test func anExistingWorldReadableLogLosesTheOthersBits() throws {
        let dir = try temporaryDirectory()
        let path = dir + "/sealpost.log"
        defer { _ = unlink(path); _ = rmdir(dir) }
        let fd = open(path, O_WRONLY | O_CREAT, 0o644)
        try #require(fd >= 0)
        _ = fchmod(fd, 0o664)   // as an older version or a rotation tool left it
        close(fd)
        let sink = LogSink(path: path, hostname: "mx.example.test", echo: false)
        try sink.open()
        #expect(mode(path) == 0o660)
    }
}

@Suite struct LogSinkFullDiskTests {
    /// The log on a disk that refuses every write (/dev/full: ENOSPC), then,
    /// after a reopen (what SIGHUP does), on one that takes them again.
    @Test func linesThatCannotBeWrittenAreCountedAndReportedByTheNextWrite() throws {
        var template = Array("/tmp/sealpost-logfull-XXXXXX".utf8CString)
        let dir = try #require(mkdtemp(&template).map { String(cString: $0) })
        let path = dir + "/sealpost.log"
        defer { _ = unlink(path); _ = rmdir(dir) }
        try #require(symlink("/dev/full", path) == 0)
        var device = stat()
        try #require(stat("/dev/full", &device) == 0)
        let sink = LogSink(path: path, hostname: "mx.example.test", echo: false)
        try sink.open()
        // Only a regular file loses its "others" bits (as root, /dev/full
        // would otherwise become 0660 for the whole machine).
        var after = stat()
        try #require(stat("/dev/full", &after) == 0)
        #expect(after.st_mode == device.st_mode)
        sink.write("queue[1]: first")
        sink.append("queue[1]: second")
        sink.append("smtp-listen[2]: third")
        sink.flush()
        #expect(sink.unreportedLostLines == 3)

        try #require(unlink(path) == 0)
        try sink.open()
        sink.write("queue[1]: fourth")
        #expect(sink.unreportedLostLines == 0)
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        try #require(lines.count == 2)
        #expect(lines[0].contains(" mx supervise[\(getpid())]: warning: 3 log lines not written since "))
        #expect(lines[0].hasSuffix(": No space left on device"))
        #expect(lines[1].hasSuffix(" mx queue[1]: fourth"))
    }
}
