import Testing
@testable import Supervision

@Suite struct StagesFileTests {
    @Test func parsesNamesExecutablesArgumentsAndComments() throws {
        let text = """
            # Pipeline stages
            queue          queue
              local-deliver  /usr/bin/python3 /tmp/deliver.py -v   # swapped

            """
        let stages = try StagesFile.parse(text, file: "stages", binDirectory: "/b/release")
        #expect(stages == [
            StageDefinition(name: "queue", executable: "/b/release/queue", arguments: [], line: 2),
            StageDefinition(name: "local-deliver", executable: "/usr/bin/python3",
                            arguments: ["/tmp/deliver.py", "-v"], line: 3),
        ])
        #expect(stages[1].userName == "sealpost-local-deliver")
    }

    @Test func hashInsideAFieldIsNotAComment() throws {
        let stages = try StagesFile.parse("a x#y z\n", file: "s", binDirectory: "/b")
        #expect(stages[0].arguments == ["z"])
        #expect(stages[0].executable == "/b/x#y")
    }

    @Test(arguments: ["Queue q", "1queue q", "que_ue q", "-q q", "aaaaaaaaaaaaaaaaaaaaaaaa q"])
    func rejectsBadNames(line: String) {
        #expect(throws: StagesFileError.self) {
            try StagesFile.parse("# c\n\(line)\n", file: "Pipeline/stages", binDirectory: "/b")
        }
        do {
            _ = try StagesFile.parse("# c\n\(line)\n", file: "Pipeline/stages", binDirectory: "/b")
        } catch {
            #expect(error.line == 2)
            #expect(error.description.hasPrefix("Pipeline/stages:2: bad stage name"))
        }
    }

    @Test func acceptsTheLongestName() throws {
        let name = String(repeating: "a", count: StagesFile.maximumNameLength)
        let stages = try StagesFile.parse("\(name) q\n", file: "s", binDirectory: "/b")
        #expect(stages[0].userName.utf8.count == 32)
    }

    @Test func rejectsDuplicatesNamingBothLines() {
        do {
            _ = try StagesFile.parse("queue q\n\nqueue r\n", file: "s", binDirectory: "/b")
            Issue.record("no error")
        } catch {
            #expect(error.description == "s:3: stage \"queue\" is already defined on line 1")
        }
    }

    @Test func rejectsAMissingExecutableAndAnEmptyFile() {
        #expect(throws: StagesFileError(file: "s", line: 1,
            message: "stage \"queue\" has no executable (expected: NAME EXECUTABLE [ARGUMENTS...])")) {
            try StagesFile.parse("queue   # nothing\n", file: "s", binDirectory: "/b")
        }
        #expect(throws: StagesFileError(file: "s", line: nil, message: "no stage defined")) {
            try StagesFile.parse("# only comments\n\n", file: "s", binDirectory: "/b")
        }
    }

    @Test func loadNamesTheFileAndWhyItCannotBeRead() {
        // /dev/null reads as an empty file.
        #expect(throws: StagesFileError(file: "/dev/null", line: nil, message: "no stage defined")) {
            try StagesFile.load(path: "/dev/null", binDirectory: "/b")
        }
        #expect(throws: StagesFileError(file: "/tmp", line: nil, message: "not a regular file")) {
            try StagesFile.load(path: "/tmp", binDirectory: "/b")
        }
        #expect(throws: StagesFileError(file: "/nonexistent/stages", line: nil, message: "cannot open: No such file or directory")) {
            try StagesFile.load(path: "/nonexistent/stages", binDirectory: "/b")
        }
    }
}
