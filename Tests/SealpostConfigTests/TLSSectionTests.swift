import Testing
@testable import SealpostConfig

@Suite struct TLSSectionTests {
    @Test func shippedFileUsesTheSelfSignedPairInTheDataDirectory() throws {
        let config = try SealpostConfiguration.load(path: checkoutConfig)
        let tls = checkoutRoot + "/var/tls"
        #expect(config.tlsDirectory == tls)
        #expect(config.tlsSocket == checkoutRoot + "/var/run/tls")
        #expect(config.tls.certificates == [
            TLSCertificateSettings(certificateFile: tls + "/self-signed-ecdsa.crt", keyFile: tls + "/self-signed-ecdsa.key"),
            TLSCertificateSettings(certificateFile: tls + "/self-signed-rsa.crt", keyFile: tls + "/self-signed-rsa.key"),
        ])
        // The file is the schema: its values are the built-in defaults.
        #expect(config.tls == TLSSettings(tlsDirectory: tls))
        #expect(config.tls.caFile == "/etc/ssl/certs/ca-certificates.crt")
        #expect(config.tls.protocols == ["TLSv1.2", "TLSv1.3"])
        #expect(config.tls.sessionTickets)
        #expect(config.tls.handshakeTimeout == 60)
        #expect(config.tls.idleTimeout == 300)
    }

    @Test func defaultsFollowTheDataDirectory() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[sealpost]\ndata_directory = \"/srv/mail\"\n")
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.tls.certificates.map(\.keyFile) == ["/srv/mail/tls/self-signed-ecdsa.key",
                                                          "/srv/mail/tls/self-signed-rsa.key"])
    }

    @Test func everyKey() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("etc/sealpost.toml", """
            [sealpost]
            data_directory = "/d"
            [tls]
            ca_file = "ca/bundle.pem"
            ca_bundles = { mta-sts = "$data_directory/sts.pem" }
            protocols = ["TLSv1.3", "TLSv1.3"]
            session_tickets = false
            handshake_timeout = "2m"
            idle_timeout = 600
            [[tls.certificates]]
            cert = "/etc/ssl/mx.pem"
            key = "mx.key"
            names = ["MX.example.org", "*.Example.net"]
            """)
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.tls.certificates == [
            TLSCertificateSettings(certificateFile: "/etc/ssl/mx.pem", keyFile: directory.path + "/etc/mx.key",
                                   names: ["mx.example.org", "*.example.net"]),
        ])
        #expect(config.tls.caFile == directory.path + "/etc/ca/bundle.pem")
        #expect(config.tls.caBundles == ["mta-sts": "/d/sts.pem"])
        #expect(config.tls.allCABundles == ["mta-sts": "/d/sts.pem", "default": directory.path + "/etc/ca/bundle.pem"])
        #expect(config.tls.protocols == ["TLSv1.3"])
        #expect(!config.tls.sessionTickets)
        #expect(config.tls.handshakeTimeout == 120)
        #expect(config.tls.idleTimeout == 600)
    }

    @Test func emptyListAndNoCABundle() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[tls]\ncertificates = []\nca_file = \"\"\n")
        let config = try SealpostConfiguration.load(path: file)
        #expect(config.tls.certificates.isEmpty)
        #expect(config.tls.caFile == nil)
        #expect(config.tls.allCABundles.isEmpty)
    }

    @Test func unknownKey() {
        expectError("[tls]\nprotocols = [\"TLSv1.2\"]\nsession_ticket = true\n", line: 3, key: "tls.session_ticket",
                    "unknown key (known in [tls]: certificates, ca_file, ca_bundles, protocols, client_opportunistic_ciphers, session_tickets, handshake_timeout, idle_timeout)")
    }

    @Test func deprecatedProtocol() {
        expectError("[tls]\n\nprotocols = [\"TLSv1.1\", \"TLSv1.2\"]\n", line: 3, key: "tls.protocols",
                    "unsupported \"TLSv1.1\" (known: TLSv1.2, TLSv1.3; SSLv3, TLSv1 and TLSv1.1 are deprecated by RFC 8996)")
        expectError("[tls]\nprotocols = []\n", line: 2, key: "tls.protocols", "must list at least one of TLSv1.2, TLSv1.3")
    }

    @Test func errorsInTheSecondCertificateNameItsLine() {
        expectError("""
            [tls]
            [[tls.certificates]]
            cert = "a.pem"
            key = "a.key"

            [[tls.certificates]]
            cert = "b.pem"
            key = "b.key"
            names = ["mx.example.org", "bad name"]
            """, line: 9, key: "tls.certificates.1.names",
            "not a host name (\"*.\" allowed as the first label): \"bad name\"")
        expectError("[tls]\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n[[tls.certificates]]\ncert = \"c\"\n",
                    line: 5, key: "tls.certificates.1", "missing key \"key\"")
        expectError("[tls]\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\nchain = \"c\"\n",
                    line: 5, key: "tls.certificates.0.chain", "unknown key (known in [[tls.certificates]]: cert, key, names)")
        expectError("[tls]\n[[tls.certificates]]\ncert = 5\nkey = \"b\"\n",
                    line: 3, key: "tls.certificates.0.cert", "expected a string, found an integer")
        expectError("[tls]\ncertificates = \"x.pem\"\n", line: 2, key: "tls.certificates",
                    "expected [[tls.certificates]] tables, found a string")
    }

    /// The list is OpenSSL's to judge (crypto-negotiate, at start); here
    /// only what cannot be a cipher list, and "@" directives, which would
    /// lower the security level of the whole context.
    @Test func clientOpportunisticCiphers() throws {
        let directory = TemporaryDirectory()
        let file = directory.write("sealpost.toml", "[tls]\nclient_opportunistic_ciphers = \"ECDHE+AESGCM:RSA+AES:!aNULL\"\n")
        #expect(try SealpostConfiguration.load(path: file).tls.clientOpportunisticCiphers == "ECDHE+AESGCM:RSA+AES:!aNULL")
        let absent = directory.write("absent.toml", "[tls]\n")
        #expect(try SealpostConfiguration.load(path: absent).tls.clientOpportunisticCiphers == nil)
        expectError("[tls]\nclient_opportunistic_ciphers = \"\"\n", line: 2, key: "tls.client_opportunistic_ciphers",
                    "must not be empty (leave the key out for the default list)")
        expectError("[tls]\nclient_opportunistic_ciphers = \"ALL@SECLEVEL=0\"\n", line: 2, key: "tls.client_opportunistic_ciphers",
                    "\"@\" directives (@SECLEVEL, @STRENGTH) are not allowed: \"ALL@SECLEVEL=0\"")
        expectError("[tls]\nclient_opportunistic_ciphers = \"AES128-SHA;rm\"\n", line: 2, key: "tls.client_opportunistic_ciphers",
                    "not an OpenSSL cipher list (character \";\"): \"AES128-SHA;rm\"")
        expectError("[tls]\nclient_opportunistic_ciphers = [\"AES128-SHA\"]\n", line: 2, key: "tls.client_opportunistic_ciphers",
                    "expected a string, found an array")
    }

    @Test func pathsAndTimeouts() {
        expectError("[tls]\nca_file = \"$config_directory/ca.pem\"\n", line: 2, key: "tls.ca_file",
                    "unknown variable in \"$config_directory/ca.pem\" (only $data_directory is known)")
        expectError("[tls]\nidle_timeout = \"5x\"\n", line: 2, key: "tls.idle_timeout", "not a duration: \"5x\"")
        expectError("[tls]\nhandshake_timeout = \"2h\"\n", line: 2, key: "tls.handshake_timeout", "must be between 1s and 1h")
        expectError("[tls]\nidle_timeout = 0\n", line: 2, key: "tls.idle_timeout", "must be between 1s and 1d")
        expectError("[tls]\nsession_tickets = \"yes\"\n", line: 2, key: "tls.session_tickets", "expected true or false, found a string")
        expectError("[tls]\n[tls.ca_bundles]\ndefault = \"x.pem\"\n", line: 3, key: "tls.ca_bundles.default",
                    "\"default\" is ca_file; give this bundle another name")
    }
}
