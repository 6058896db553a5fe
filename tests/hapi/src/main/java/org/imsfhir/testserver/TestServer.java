package org.imsfhir.testserver;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.jdbc.DataSourceAutoConfiguration;
import org.springframework.boot.autoconfigure.orm.jpa.HibernateJpaAutoConfiguration;
import org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration;

/**
 * A HAPI FHIR JPA server (FHIR R4; in-memory H2, or PostgreSQL: see {@code FhirConfig.Database})
 * for ims-fhir's integration tests and demo.
 *
 * <p>Listens on 127.0.0.1 at /fhir. Port: {@code --server.port=N} (0 picks a free one; the
 * chosen port is printed as "IMS-FHIR-TEST-SERVER-LISTENING http://127.0.0.1:N/fhir").
 */
@SpringBootApplication(
		exclude = {
			DataSourceAutoConfiguration.class,
			ElasticsearchRestClientAutoConfiguration.class,
			HibernateJpaAutoConfiguration.class,
			ThymeleafAutoConfiguration.class
		})
public class TestServer {

	public static void main(String[] args) {
		SpringApplication.run(TestServer.class, args);
	}
}
